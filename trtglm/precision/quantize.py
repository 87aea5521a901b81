"""Explicit quantization of the linear layers with ONNX Runtime's quantizers, in the forms TensorRT builds.

    int8  quantize_static: QDQ, symmetric (zero-point 0), weights per output channel, activations per tensor
    fp8   quantize_static: QDQ, E4M3, per-channel weights; activation scale = calibrated amax / 448 (TensorRT's
          rule, given as TensorQuantOverrides: ONNX Runtime's own fp8 scales assume a Gaussian and clip)
    int4  MatMulNBitsQuantizer: weight-only DequantizeLinear, signed, blockwise along K, no zero-point

Only MatMuls with a constant weight are touched (the linear layers); the lm_head is left out unless
asked (NVIDIA's LLM recipes leave it too: logits are the most sensitive GEMM). Outputs of MatMuls are
not quantized: TensorRT fuses the DQ-MatMul pair into an int8/fp8 GEMM with a half-precision output.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx

from ..model.moe import ROUTER

METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def linear_nodes(model: onnx.ModelProto, include_lm_head: bool) -> tuple[list[str], list[str]]:
    """(MatMul nodes with a constant 2-D weight to quantize, the lm_head nodes left out)."""
    consts = {t.name for t in model.graph.initializer if len(t.dims) == 2}  # [in, out] matrices (not MLA's per-head
    # absorbed [heads, in, out] stacks)
    producers = {o: n for n in model.graph.node for o in n.output}
    heads = set()
    for out in model.graph.output:
        node = producers.get(out.name)
        while node is not None and node.op_type in ("Cast", "Identity"):
            node = producers.get(node.input[0])
        if node is not None and node.op_type == "MatMul":
            heads.add(node.name)
    linear = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in consts
              and not n.name.startswith(ROUTER)]  # a MoE router stays fp32: a flipped choice changes a token's MLP
    skipped = [] if include_lm_head else [n for n in linear if n in heads]
    return [n for n in linear if n not in skipped], skipped


FP8_MAX = 448.0


def quantize_activations(src: Path, dst: Path, dtype: str, nodes: list[str], reader, method: str,
                         cache_file: Path, amax: dict[str, float] | None = None) -> None:
    """int8 or fp8 W8A8 QDQ of `nodes`; calibration ranges cached in `cache_file` (ORT's own cache format).
    fp8 needs `amax`, the calibrated magnitude of each activation."""
    import ml_dtypes
    import numpy as np
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    qtype = {"int8": QuantType.QInt8, "fp8": QuantType.QFLOAT8E4M3FN}[dtype]
    calibrate = CalibrationMethod.Distribution if dtype == "fp8" else getattr(CalibrationMethod, METHODS[method])
    overrides = {}
    if dtype == "fp8":
        from onnxruntime.quantization.calibrate import (
            TensorData,
            TensorsData,
            save_tensors_data,
        )

        model = onnx.load(src, load_external_data=False)
        for node in model.graph.node:
            if node.name in nodes:
                overrides[node.input[0]] = [{"scale": np.array(max(amax[node.input[0]], 1e-6) / FP8_MAX, np.float32),
                                             "zero_point": np.array(0, ml_dtypes.float8_e4m3fn)}]
        # ONNX Runtime insists on a distribution calibration for fp8 even when every scale is given: hand it the
        # calibrated magnitudes in that form instead of running a second, much slower calibration
        if not cache_file.is_file():
            save_tensors_data(TensorsData(CalibrationMethod.Distribution, {
                name: TensorData(avg=np.float32(0), std=np.float32(amax[name]), lowest=np.float32(-amax[name]),
                                 highest=np.float32(amax[name])) for name in overrides}), cache_file)
        reader = None
    with quiet(), _calibration_without_prepacking(), calibration_without_weight_copies():
        quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, nodes_to_quantize=nodes,
                        op_types_to_quantize=["MatMul"], per_channel=True, activation_type=qtype, weight_type=qtype,
                        calibrate_method=calibrate, use_external_data_format=True,
                        calibration_cache_path=str(cache_file),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul"],
                                       "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                                       "TensorQuantOverrides": overrides})


def quantize_weights_int4(model: onnx.ModelProto, nodes: list[str], block_size: int) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with quiet():
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in nodes]
        q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True, quant_format=QuantFormat.QDQ,
                                 op_types_to_quantize=("MatMul",), nodes_to_exclude=others)  # _include is ignored
        q.process()
    return q.model.model


@contextlib.contextmanager
def calibration_without_weight_copies():
    """ONNX Runtime's calibrators record every input and output of the nodes they calibrate, for every window at
    once: in a mixture-of-experts graph the expert MatMuls read a Gather of the stacked expert weights, a copy of
    a layer's experts per window. Those are weights, not activations: left out."""
    from onnxruntime.quantization.calibrate import CalibraterBase

    from .experts import expert_gathers

    original = CalibraterBase.select_tensors_to_calibrate

    def select_tensors_to_calibrate(self, model):
        tensors, value_infos = original(self, model)
        return tensors - {g.output[0] for g in expert_gathers(model)}, value_infos

    CalibraterBase.select_tensors_to_calibrate = select_tensors_to_calibrate
    try:
        yield
    finally:
        CalibraterBase.select_tensors_to_calibrate = original


@contextlib.contextmanager
def _calibration_without_prepacking():
    """ONNX Runtime's calibrator runs its graph in a CPU session that prepacks every constant MatMul weight, a
    second copy of each (bench/RESULTS.md: GLM-4-9B's last stage, with its lm_head): the same session without
    prepacking."""
    import onnxruntime
    from onnxruntime.quantization.calibrate import CalibraterBase

    def create_inference_session(self):
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
        self.infer_session = onnxruntime.InferenceSession(self.augmented_model_path, sess_options=options,
                                                          providers=self.execution_providers)

    original = CalibraterBase.create_inference_session
    CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        CalibraterBase.create_inference_session = original


@contextlib.contextmanager
def quiet():
    """ONNX Runtime's quantizers log every node and advise pre-processing on the root logger, and its
    distribution calibrator prints to stdout (which `--json` owns)."""
    import io

    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
