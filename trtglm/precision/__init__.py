"""The precision stage of `trtglm build`: the fused fp32 graph rewritten into the recipe's precision.

    fused fp32 ─┬─ fp16 | bf16 ─────────────────────────────────────────── to_half (islands from ranges)
                ├─ int8 | fp8 ─ calibrate + quantize_static (W8A8 QDQ) ─── to_half(fp16)
                └─ int4 ─────── MatMulNBitsQuantizer (weight-only QDQ) ─── to_half(fp16)
    stacked expert weights (MoE), int8 | int4: weight-only DQ before their Gather (experts.py)

TensorRT 11 and TensorRT-RTX are strongly typed: these types, Casts and Q/DQ nodes ARE the precision;
no builder flag adds any. Calibration (token windows of real text, prefill, empty cache) runs on the
fp32 graph in ONNX Runtime; its ranges are cached under a key of graph, data and method.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..core.errors import UsageError
from ..core.files import atomic_file
from ..core.graphs import describe_onnx
from ..core.memory import BASE_BYTES, require
from ..core.recipe import PrecisionSection
from ..model.moe import ROUTER
from .calibration import CalibrationSet
from .experts import expert_gathers, quantize_experts
from .half import name_nodes, overflowing_nodes, position_only_nodes, to_half
from .quantize import calibration_without_weight_copies, linear_nodes, quantize_activations, quantize_weights_int4, quiet

QUANTIZED = ("int8", "int4", "fp8")
CALIBRATED = ("int8", "fp8")
# Peak memory of the stage: a fixed part (calibration sessions, libraries) plus a part per byte of fp32
# weights (the graph is held as protobuf and ONNX Runtime's tools copy it): an upper bound, with a margin, of
# what `python bench/precision.py` measures of whole graphs and bench/RESULTS.md of GLM-4-9B's stages.
FIXED_BYTES = 2.5e9
PER_FP32_BYTE = {"fp16": 3.5, "bf16": 3.5, "int8": 2.9, "fp8": 4.3, "int4": 1.6}


def conversion_peak(dtype: str, fp32_weight_bytes: int) -> int:
    """The estimated peak memory of converting a graph of `fp32_weight_bytes` to `dtype`, libraries included."""
    return int(BASE_BYTES + FIXED_BYTES + PER_FP32_BYTE[dtype] * fp32_weight_bytes)


def check_memory(dtype: str, fp32_weight_bytes: int) -> None:
    require(FIXED_BYTES + PER_FP32_BYTE[dtype] * fp32_weight_bytes, f"converting this fp32 graph to {dtype}",
            "build in stages (--max-memory), convert on a larger machine, or export in fp16/bf16 and build in "
            "that dtype", UsageError)


@dataclass(frozen=True)
class Conversion:
    """One precision conversion: the fp32 graph `onnx_path` (weights in `data_file` beside it), rewritten in
    place into `dtype` as the recipe's precision section says."""

    onnx_path: Path
    data_file: str
    dtype: str
    precision: PrecisionSection
    calibration: CalibrationSet | None
    cache_dir: Path  # calibration ranges, reused across builds
    graph_sha256: str  # of the graph and its weights: part of the ranges' cache key
    on_calibration: Callable[[int, int], None] | None = None  # (windows done, windows)
    # a stage of a staged build: window index -> the hidden states the stages before computed for it
    stage_inputs: Callable[[int], dict[str, np.ndarray]] | None = None


def convert(job: Conversion) -> dict:
    """Rewrite the graph in place; returns the manifest's record of what was done."""
    import onnxruntime

    onnx_path, data_file, dtype, precision, calibration = (job.onnx_path, job.data_file, job.dtype, job.precision,
                                                           job.calibration)

    started = time.perf_counter()
    record = {"dtype": dtype, "from": "fp32", "tool": f"onnxruntime.quantization {onnxruntime.__version__}",
              "compute": "fp16" if dtype in QUANTIZED else dtype}
    with tempfile.TemporaryDirectory(dir=onnx_path.parent, prefix=".precision-") as work:
        work = Path(work)
        # int8/fp8: quantize_static reads the weights from disk itself; only the structure is needed here
        model = onnx.load(onnx_path, load_external_data=dtype not in CALIBRATED)
        inputs = describe_onnx(onnx_path)["inputs"]
        ranges = None
        if dtype in ("fp16", "fp8") and calibration is not None:
            ranges, record["range_cache"] = _ranges(job, inputs)
        elif dtype == "fp16":
            record["range_check"] = "skipped: the export has no tokenizer.json to calibrate with"
        if dtype in QUANTIZED:
            quantized = _quantize(model, job, inputs, work, ranges, record)
            del model  # a parsed model keeps every weight it ever held until it is freed: read the result anew
            model = onnx.load(quantized)
            if dtype in ("int8", "int4") and expert_gathers(model):
                record["experts"] = quantize_experts(model, dtype, precision.quantization.block_size)
        model = _half(model, "fp16" if dtype in QUANTIZED else dtype, precision, ranges if dtype == "fp16" else None,
                      record)
        onnx.save(model, work / onnx_path.name, save_as_external_data=True, location=data_file,
                  all_tensors_to_one_file=True)
        del model
        (onnx_path.parent / data_file).unlink(missing_ok=True)
        for f in (onnx_path.name, data_file):
            shutil.move(work / f, onnx_path.parent / f)
    record["seconds"] = round(time.perf_counter() - started, 2)
    return record


def _quantize(model: onnx.ModelProto, job: Conversion, inputs: list[dict], work: Path, ranges,
              record: dict) -> Path:
    """The quantized graph, written to `work`."""
    dtype, precision, calibration = job.dtype, job.precision, job.calibration
    nodes, skipped = linear_nodes(model, precision.quantization.lm_head)
    if not nodes:
        raise UsageError("no MatMul with a constant weight to quantize in this graph")
    record["quantized_nodes"], record["kept_half"] = len(nodes), skipped
    if dtype == "int4":
        block = precision.quantization.block_size
        _check_blocks(model, nodes, block)
        record["block_size"] = block
        onnx.save(quantize_weights_int4(model, nodes, block), work / "q.onnx", save_as_external_data=True,
                  location="q.onnx.data", all_tensors_to_one_file=True)
        return work / "q.onnx"
    if calibration is None:
        raise UsageError(f"{dtype} needs calibration data")
    cache = job.cache_dir / f"{_key(job.graph_sha256, calibration, dtype)}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    record["calibration_cache"] = {"key": cache.stem, "hit": cache.is_file()}
    quantize_activations(job.onnx_path, work / "q.onnx", dtype, nodes, calibration.reader(inputs, job.on_calibration, job.stage_inputs),
                         calibration.method, cache, amax=ranges)
    return work / "q.onnx"


def _half(model: onnx.ModelProto, dtype: str, precision, ranges, record: dict) -> onnx.ModelProto:
    name_nodes(model)
    islands = overflowing_nodes(model, ranges) if ranges else []
    positions = position_only_nodes(model)
    routers = [n.name for n in model.graph.node if n.name.startswith(ROUTER)]
    record["fp32_islands"] = {"ops": list(precision.fp32_ops), "position_only_nodes": len(positions),
                              "router_nodes": len(routers), "overflowing_nodes": islands}
    return to_half(model, dtype, fp32_ops=precision.fp32_ops, fp32_nodes=[*positions, *routers, *islands],
                   keep_fp32_io=("logits",) if precision.logits_dtype == "fp32" else ())


def _check_blocks(model: onnx.ModelProto, nodes: list[str], block_size: int) -> None:
    """Before any quantization: the block divides the input width of every linear layer and stack of experts."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    widths = [(node.name, node.input[1], shapes[node.input[1]][0]) for node in model.graph.node if node.name in nodes]
    widths += [("the experts", g.input[0], shapes[g.input[0]][1]) for g in expert_gathers(model)]  # [E, K, N]
    for what, weight, k in widths:
        if k % block_size:
            raise UsageError(f"int4 block size {block_size} does not divide the input width {k} of {what} "
                             f"({weight})", hint="set precision.quantization.block_size in the recipe")


def _key(graph_sha256: str, calibration: CalibrationSet, purpose: str) -> str:
    import onnxruntime

    h = hashlib.sha256(f"{graph_sha256} {calibration.fingerprint} {calibration.method} {purpose} "
                       f"{onnxruntime.__version__}".encode())
    return h.hexdigest()[:32]


def _ranges(job: Conversion, inputs: list[dict]):
    """The largest magnitude of every tensor of the fp32 graph over the calibration windows (cached)."""
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        create_calibrator,
        load_tensors_data,
        save_tensors_data,
    )

    key = _key(job.graph_sha256, job.calibration, "ranges")
    cache = job.cache_dir / f"{key}.json"
    hit = cache.is_file()
    if not hit:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="trtglm-ranges-") as tmp, quiet(), calibration_without_weight_copies():
            calibrator = create_calibrator(job.onnx_path, [], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
            calibrator.collect_data(job.calibration.reader(inputs, job.on_calibration, job.stage_inputs))
            data = calibrator.compute_data()
        with atomic_file(cache) as partial:
            save_tensors_data(data, partial)
    data = load_tensors_data(cache)
    ranges = {name: float(np.abs(np.asarray(r.range_value, dtype=np.float64)).max()) for name, r in data.data.items()}
    return ranges, {"key": key, "hit": hit}
