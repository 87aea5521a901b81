"""fp32 graph -> fp16 or bf16 graph with fp32 islands, by ONNX Runtime's float16 converter.

    fp32 ModelProto ─ convert_float_to_float16(op_block_list=islands by op type,
                  │                           node_block_list=islands by node, keep_io_types=[logits])
                  └─ bf16: every FLOAT16 relabelled BFLOAT16, weights rounded from their fp32 originals

Islands are kept fp32 with Casts around them: op types named in the recipe; the position-only subgraph
(rotary angles: positions up to thousands times inv_freq need fp32's mantissa, as in the fp16 export);
and nodes that read or write a tensor whose calibrated range would overflow fp16 (|x| > FP16_SAFE). RMSNormalization needs no island: its
`stash_type` computes the reduction in fp32 whatever the input type.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

FP16_SAFE = 16384.0  # a quarter of fp16's largest finite value: calibration does not see every input


def overflowing_nodes(model: onnx.ModelProto, absmax: dict[str, float]) -> list[str]:
    """Names of nodes reading or writing a tensor whose calibrated magnitude exceeds FP16_SAFE. Graph inputs
    do not count: calibration feeds an empty KV cache, whose "range" is the reduction's identity."""
    inputs = {i.name for i in model.graph.input}
    return [node.name for node in model.graph.node
            if any(absmax.get(t, 0.0) > FP16_SAFE for t in [*node.input, *node.output] if t not in inputs)]


def position_only_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes computed from position_ids or attention_mask (and constants), with no path from the tokens (or a
    stage's hidden states) or the KV cache: rotary angles and tables, mask construction. Rows looked up in a constant table by position
    (Gather) are left out: a lookup computes nothing, so the table may as well be stored in half precision."""
    positions = {"position_ids", "attention_mask"}
    activations = {i.name for i in model.graph.input  # a later stage's tokens are its hidden states
                   if i.name == "input_ids" or i.name.startswith(("past_key_values.", "hidden."))}
    tables = {t.name for t in model.graph.initializer}
    out = []
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if any(i in activations for i in node.input):
            activations.update(node.output)
        elif any(i in positions for i in node.input):
            positions.update(node.output)
            if not (node.op_type == "Gather" and node.input[0] in tables):
                out.append(node.name)
    return out


def to_half(model: onnx.ModelProto, dtype: str, *, fp32_ops=(), fp32_nodes=(), keep_fp32_io=("logits",)) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import (
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )

    from onnxruntime.transformers import float16

    name_nodes(model)
    originals = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT} if dtype == "bf16" else {}
    io = {v.name for v in [*model.graph.input, *model.graph.output]}
    _infer_types(model)
    # the converter's own weight conversion holds several full-size temporaries per weight (int64 indices of
    # every positive value, four whole-array copies), and it reads a converted weight back into an array for its
    # shape: both replaced by equivalents that hold one slice at a time and read the shape from the dims
    patched = {"convert_tensor_float_to_float16": _tensor_to_float16,
               "make_value_info_from_tensor": _value_info_of}
    saved = {name: getattr(float16, name) for name in patched}
    try:
        for name, f in patched.items():
            setattr(float16, name, f)
        half = convert_float_to_float16(model, keep_io_types=[n for n in keep_fp32_io if n in io],
                                        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *fp32_ops],
                                        node_block_list=list(fp32_nodes), disable_shape_infer=True)
    finally:
        for name, f in saved.items():
            setattr(float16, name, f)
    half = _repair(half)
    return _fp16_to_bf16(half, originals) if dtype == "bf16" else half


SLICE = 1 << 24  # elements converted at a time


def to_float16(values: np.ndarray, min_positive: float = 5.96e-08, max_finite: float = 65504.0) -> np.ndarray:
    """fp32 -> fp16 as ONNX Runtime's converter rounds: magnitudes below `min_positive` become it, finite ones
    above `max_finite` become it (signs kept); 0, NaN and infinities unchanged. One slice at a time."""
    flat = values.reshape(-1)
    out = np.empty(flat.shape, np.float16)
    for start in range(0, flat.size, SLICE):
        x = np.array(flat[start:start + SLICE], np.float32)
        x[(x > 0) & (x < min_positive)] = min_positive
        x[(x < 0) & (x > -min_positive)] = -min_positive
        x[(x > max_finite) & np.isfinite(x)] = max_finite
        x[(x < -max_finite) & np.isfinite(x)] = -max_finite
        out[start:start + SLICE] = x
    return out.reshape(values.shape)


def _tensor_to_float16(tensor: TensorProto, min_positive_val: float = 5.96e-08,
                       max_finite_val: float = 65504.0) -> TensorProto:
    if tensor.data_type != TensorProto.FLOAT:
        return tensor
    tensor.data_type = TensorProto.FLOAT16
    if tensor.float_data:
        half = to_float16(np.array(tensor.float_data, np.float32), min_positive_val, max_finite_val)
        tensor.int32_data[:] = half.view(np.uint16).astype(np.int32).tolist()
        tensor.float_data[:] = []
    if tensor.raw_data:
        half = to_float16(np.frombuffer(tensor.raw_data, np.float32), min_positive_val, max_finite_val)
        tensor.raw_data = half.tobytes()
    return tensor


def _value_info_of(tensor: TensorProto) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


def _infer_types(model: onnx.ModelProto) -> None:
    """The converter needs every tensor's type in value_info. Its own onnx shape inference serializes the
    model, which fails past protobuf's 2 GB (fp32 models from about 500M parameters); onnx-ir's pass leaves
    the initializers' data out."""
    import onnx_ir as ir
    import onnx_ir.passes.common

    ir_model = ir.from_proto(model)
    onnx_ir.passes.common.ShapeInferencePass()(ir_model)
    del model.graph.value_info[:]
    model.graph.value_info.extend(ir.serde.serialize_value(v) for node in ir_model.graph for v in node.outputs
                                  if v.type is not None and not v.is_graph_output())


def _repair(model: onnx.ModelProto) -> onnx.ModelProto:
    """Three flaws of the converter: a tensor feeding two fp32 nodes gets two identical Casts (same name, same
    output: an invalid model); an edge between two fp32 islands goes through fp16 (fp32->fp16->fp32 Casts,
    which overflow exactly where the islands were meant to prevent it); the Casts are appended at the end of
    the node list (not topological)."""
    import onnx_ir as ir
    import onnx_ir.passes.common  # noqa: F401 - not imported by `import onnx_ir`

    seen, keep = set(), []
    for node in model.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    graph = ir.from_proto(model)
    g = graph.graph
    for node in list(g):
        first = node.inputs[0].producer() if node.op_type == "Cast" and node.inputs else None
        if (first is not None and first.op_type == "Cast" and node.attributes["to"].as_int() == TensorProto.FLOAT
                and first.attributes["to"].as_int() == TensorProto.FLOAT16
                and first.inputs[0].dtype == ir.DataType.FLOAT and not node.outputs[0].is_graph_output()):
            ir.convenience.replace_all_uses_with(node.outputs[0], first.inputs[0])
    ir.passes.common.RemoveUnusedNodesPass()(graph)
    g.sort()
    out = ir.to_proto(graph)
    del out.graph.value_info[:]  # the converter's are partly stale; nothing downstream needs them
    return out


def name_nodes(model: onnx.ModelProto) -> None:
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
