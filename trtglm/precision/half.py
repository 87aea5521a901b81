"""fp32 graph -> fp16 or bf16 graph with fp32 islands, by ONNX Runtime's float16 converter.

    fp32 ModelProto ─ convert_float_to_float16(op_block_list=islands by op type,
                  │                           node_block_list=islands by node, keep_io_types=[logits])
                  └─ bf16: every FLOAT16 relabelled BFLOAT16, weights rounded from their fp32 originals

Islands are kept fp32 with Casts around them: op types named in the recipe, and nodes whose calibrated
output range would overflow fp16 (|x| > FP16_SAFE). RMSNormalization needs no island: its
`stash_type` computes the reduction in fp32 whatever the input type.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

FP16_SAFE = 16384.0  # a quarter of fp16's largest finite value: calibration does not see every input


def overflowing_nodes(model: onnx.ModelProto, absmax: dict[str, float]) -> list[str]:
    """Names of nodes with an output whose calibrated magnitude exceeds FP16_SAFE."""
    return [node.name for node in model.graph.node if any(absmax.get(o, 0.0) > FP16_SAFE for o in node.output)]


def to_half(model: onnx.ModelProto, dtype: str, *, fp32_ops=(), fp32_nodes=(), keep_fp32_io=("logits",)) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    _name_nodes(model)
    originals = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT} if dtype == "bf16" else {}
    io = {v.name for v in [*model.graph.input, *model.graph.output]}
    half = convert_float_to_float16(model, keep_io_types=[n for n in keep_fp32_io if n in io],
                                    op_block_list=[*DEFAULT_OP_BLOCK_LIST, *fp32_ops], node_block_list=list(fp32_nodes))
    return _fp16_to_bf16(half, originals) if dtype == "bf16" else half


def _name_nodes(model: onnx.ModelProto) -> None:
    """The converter names its Casts after the nodes: unnamed nodes would give duplicate outputs."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_n{i}"
        seen.add(node.name)


def _fp16_to_bf16(model: onnx.ModelProto, originals: dict[str, TensorProto]) -> onnx.ModelProto:
    import ml_dtypes

    def retype(t: onnx.TypeProto) -> None:
        if t.HasField("tensor_type") and t.tensor_type.elem_type == TensorProto.FLOAT16:
            t.tensor_type.elem_type = TensorProto.BFLOAT16

    def bf16(tensor: TensorProto) -> TensorProto:
        source = originals.get(tensor.name, tensor)
        values = numpy_helper.to_array(source).astype(np.float32).astype(ml_dtypes.bfloat16)
        return numpy_helper.from_array(values, tensor.name)

    g = model.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT16:
            g.initializer[i].CopyFrom(bf16(t))
    for v in [*g.input, *g.output, *g.value_info]:
        retype(v.type)
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.BFLOAT16
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT16:
                a.t.CopyFrom(bf16(a.t))
    return model
