"""A build's mixture-of-experts blocks as ONNX Runtime's MoE op (com.microsoft), for ONNX Runtime only.

    flat [N,H] ─ TopK-gathered experts (model/moe.py) ─ ReduceSum ─> routed [N,H]
    R [N,E]: each token's routing weight per expert (0 where not chosen), from the build's own fp32 router

    ==>  flat ─ MoE(router_probs = log R where R > 0 else -1e30, k, SwiGLU with alpha 1 and beta 0,
                    normalize_routing_weights) ─ · ΣR ─> routed

The op sends each token through its top-k experts only (the gathered form sends every token through every
gathered expert) and reads the weights in place (no gather copies). It routes by softmax over router_probs,
top-k, renormalized: with log R over the chosen experts and -1e30 elsewhere, the top-k are the chosen ones and
their softmax is R / ΣR, so multiplying by ΣR gives back the router's own weights. The routing itself (the
correction bias, the groups, the scaling) stays in the graph, computed as transformers computes it; the op only
applies it. Its SwiGLU with alpha 1 and beta 0 is silu(gate) * up; its fused first projection holds gate and up
rows interleaved ([E, 2I, H]), the second [E, H, I].

Quantized experts (int8/int4, a DequantizeLinear of constants before the Gather) are dequantized once at load
into the graph's compute dtype, the same values the graph computes at every step (as the CPU backend folds fp8
weights). A graph whose rewritten experts would be over 1.5 GB is left as it is (they are embedded in the
in-memory model, which protobuf limits to 2 GB). The build's model.onnx (TensorRT's graph) is never changed.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as passes

from ..model.moe import EXPERTS

MS_DOMAIN = "com.microsoft"
EMBED_LIMIT = 1_500_000_000  # bytes of rewritten expert weights embedded in the in-memory model


def lower_moe(model: ir.Model) -> int:
    """Rewrite every MoE block of `model` (onnx-ir) into ONNX Runtime's MoE op; returns how many."""
    blocks = [b for b in (_block(topk, end) for topk, end in _pairs(model.graph)) if b is not None]
    if not blocks or sum(b.weight_bytes for b in blocks) > EMBED_LIMIT:
        return 0
    for b in blocks:
        _replace(model.graph, b)
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    passes.RemoveUnusedNodesPass()(model)  # the gathered form, and the stacked weights it read
    return len(blocks)


def _pairs(graph: ir.Graph) -> list[tuple[ir.Node, ir.Node]]:
    """(the TopK that chooses a layer's experts, the ReduceSum that sums their outputs), in graph order."""
    out, topk = [], None
    for node in graph:
        if not node.name.startswith(EXPERTS):
            continue
        if node.op_type == "TopK":
            topk = node
        elif node.op_type == "ReduceSum" and topk is not None:
            out.append((topk, node))
            topk = None
    return out


class _Block:
    def __init__(self, flat, routing, gate_up, down, top_k, end):
        self.flat, self.routing, self.top_k, self.end = flat, routing, top_k, end
        self.gate_up, self.down = gate_up, down  # [E,H,2I], [E,I,H]: stacked weights, or their dequantization
        self.dtype = _compute_dtype(gate_up)
        self.weight_bytes = sum(math.prod(_source(v).shape.numpy()) for v in (gate_up, down)) * self.dtype.itemsize


def _source(value: ir.Value) -> ir.Value:
    """The initializer a stacked weight comes from (itself, or the quantized tensor it is dequantized from)."""
    return value if value.is_initializer() else value.producer().inputs[0]


def _compute_dtype(value: ir.Value) -> np.dtype:
    """The experts' dtype once dequantized (the scale's), from the initializers' types: nothing is read."""
    tensor = value.const_value if value.is_initializer() else value.producer().inputs[1].const_value
    return np.dtype(tensor.dtype.numpy())


def _constant(value: ir.Value) -> bool:
    """A stacked weight, or its dequantization from constants."""
    if value.is_initializer() and value.const_value is not None:
        return True
    node = value.producer()
    return node is not None and node.op_type == "DequantizeLinear" and all(
        v is not None and v.is_initializer() and v.const_value is not None for v in node.inputs[:2])


def _weights(value: ir.Value) -> np.ndarray:
    if value.is_initializer():
        return _numpy(value.const_value)
    node = value.producer()  # DequantizeLinear(q [E,K,N], scale [E,K/b,N], axis 1, block b)
    q = _numpy(node.inputs[0].const_value).astype(np.float32)
    scale = _numpy(node.inputs[1].const_value)
    block = q.shape[1] // scale.shape[1]
    return (q * np.repeat(scale.astype(np.float32), block, axis=1)).astype(scale.dtype)


def _block(topk: ir.Node, end: ir.Node) -> _Block | None:
    ids = topk.outputs[1]
    gathers = [u.node for u in ids.uses() if u.node.op_type == "Gather" and u.idx == 1]
    weights = [g for g in gathers if g.attributes.get_int("axis", 0) == 0]
    routes = [g for g in gathers if g.attributes.get_int("axis", 0) == 1]
    if len(weights) != 2 or len(routes) != 1 or not all(_constant(g.inputs[0]) for g in weights):
        return None  # not this block's form
    matmuls = {}
    for g in weights:
        uses = [u.node for u in g.outputs[0].uses()]
        if len(uses) != 1 or uses[0].op_type != "MatMul" or uses[0].inputs[1] is not g.outputs[0]:
            return None
        matmuls[g] = uses[0]
    gate_up = next((g for g in weights if matmuls[g].inputs[0].producer() is None
                    or matmuls[g].inputs[0].producer().op_type != "Mul"), None)
    if gate_up is None:
        return None
    down = next(g for g in weights if g is not gate_up)
    top_k = _top_k(topk)
    if top_k is None:
        return None
    block = _Block(matmuls[gate_up].inputs[0], routes[0].inputs[0], gate_up.inputs[0], down.inputs[0], top_k, end)
    return block if block.dtype in (np.float32, np.float16) else None  # ONNX Runtime's CPU MoE types


def _numpy(tensor) -> np.ndarray:
    """A tensor's values. External data is read from its file directly: a build's data file is hard-linked by
    design (the build cache, packs), and onnx-ir refuses to read a file with more than one link."""
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor.numpy()
    shape = tuple(tensor.shape.numpy())
    count = int(np.prod(shape))
    if tensor.dtype == ir.DataType.INT4:  # two to a byte, the first in the low nibble
        raw = np.fromfile(tensor.path, np.uint8, count=(count + 1) // 2, offset=tensor.offset or 0)
        values = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(-1)[:count].astype(np.int8)
        return np.where(values > 7, values - 16, values).astype(np.int8).reshape(shape)
    dtype = tensor.dtype.numpy()
    return np.fromfile(tensor.path, dtype, count=count, offset=tensor.offset or 0).reshape(shape)


def _top_k(topk: ir.Node) -> int | None:
    """k, from the TopK's count: Min(tokens * k, E)."""
    minimum = topk.inputs[1].producer()
    mul = minimum.inputs[0].producer() if minimum is not None and minimum.op_type == "Min" else None
    if mul is None or mul.op_type != "Mul" or mul.inputs[1].const_value is None:
        return None
    return int(mul.inputs[1].const_value.numpy().reshape(-1)[0])


def _replace(graph: ir.Graph, b: _Block) -> None:
    gu, down = _weights(b.gate_up), _weights(b.down)  # [E,H,2I], [E,I,H], read only now: the size fits
    e, _, two_i = gu.shape
    i = two_i // 2
    interleaved = np.stack([gu[:, :, :i].transpose(0, 2, 1), gu[:, :, i:].transpose(0, 2, 1)], axis=2)
    name = b.end.name.replace("/", ".")
    fc1 = ir.tensor(np.ascontiguousarray(interleaved.reshape(e, two_i, -1)), name=f"{name}.moe_fc1")
    fc2 = ir.tensor(np.ascontiguousarray(down.transpose(0, 2, 1)), name=f"{name}.moe_fc2")
    values = {}
    for t in (fc1, fc2):
        values[t.name] = ir.Value(name=t.name, type=ir.TensorType(t.dtype), shape=t.shape, const_value=t)
        graph.register_initializer(values[t.name])
    tape = ir.tape.Tape()
    dtype = ir.DataType.FLOAT16 if b.dtype == np.float16 else ir.DataType.FLOAT  # (an export's values carry no
    # types)
    routing = b.routing  # [N,E], computed in fp32 by the router: read before a half-precision graph's Cast
    if routing.producer() is not None and routing.producer().op_type == "Cast":
        routing = routing.producer().inputs[0]
    chosen = tape.op("Greater", [routing, _const(tape, np.float32(0))])
    log = tape.op("Log", [tape.op("Max", [routing, _const(tape, np.float32(1e-30))])])
    probs = tape.op("Where", [chosen, log, _const(tape, np.float32(-1e30))])
    total = tape.op("ReduceSum", [routing, _const(tape, np.array([-1], np.int64))], attributes={"keepdims": 1})
    if dtype != ir.DataType.FLOAT:
        probs, total = (tape.op("Cast", [v], attributes={"to": int(dtype)}) for v in (probs, total))
    moe = tape.op("MoE", [b.flat, probs, values[fc1.name], None, values[fc2.name]], domain=MS_DOMAIN,
                  attributes={"k": b.top_k, "activation_type": "swiglu", "swiglu_fusion": 1,
                              "activation_alpha": 1.0, "activation_beta": 0.0, "swiglu_limit": 1e30,
                              "normalize_routing_weights": 1})
    routed = tape.op("Mul", [moe, total])
    routed.shape, routed.type = b.end.outputs[0].shape, b.end.outputs[0].type
    graph.insert_after(b.end, tape.nodes)
    ir.convenience.replace_all_uses_with(b.end.outputs[0], routed)
    for node in tape.nodes:
        node.name = f"moe_op/{node.op_type}_{id(node)}"


def _const(tape, value) -> ir.Value:
    return tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(value))})
