"""Logits of the last position only (`shapes.logits: last`): the lm_head reads one row per sequence.

    hidden [B,S,H] ─[Q ─ DQ]─ MatMul(lm_head) ─[Cast]─> logits [B,S,V]
    ==>  hidden ─ Slice(axis 1, -1:) ─[Q ─ DQ]─ MatMul(lm_head) ─[Cast]─> logits [B,1,V]

Generation needs only the last position's logits after a prefill (prompts are left-padded, so that is
every row's last token), and decode steps have one position anyway. For a prefill of S tokens this saves
S-1 rows of the largest GEMM (vocab x hidden) and of the logits buffer: for GLM-4-9B (vocab 151552) that
buffer is 0.6 MB per token per row in fp32. Perplexity needs every position: `trtglm eval` refuses such a
build, and the build's accuracy gate runs before this step.

The last decoder layer then serves the logits only, once its keys and values are in the cache: its
queries, mask rows and residual stream are sliced the same way, so its attention, o_proj and MLP run on
one row (1/L of a prefill's layer GEMMs saved):

    q [B,H,S,D] ─ Slice(axis 2, -1:) ─ Attention(q, K, V, mask ─ Slice(axis 2, -1:)) ─ ... o_proj ─ Add ─ MLP
    residual [B,S,H] ─ Slice(axis 1, -1:) ──────────────────────────────────────────────────┘

Only the graph changes; the weights file is left as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..core.errors import TrtglmError
from ..core.graphs import save_graph
from ..fusion.tables import add_initializer

PASS_THROUGH = ("Cast", "Identity")


def keep_last_position(onnx_path: Path) -> str:
    """Rewrite `onnx_path` (its graph only) so that `logits` has one position; returns the lm_head's name."""
    model = ir.load(onnx_path)
    if any(node.name == "last_position" for node in model.graph):
        raise TrtglmError(f"{onnx_path}: the graph computes the last position's logits already")
    head = lm_head(model.graph)
    # a quantized lm_head reads its input through a per-tensor Q -> DQ pair: slice before it, keeping the pair
    # next to the MatMul (TensorRT fuses DQ+MatMul; ONNX Runtime's integer GEMM lowering matches Q-DQ-MatMul)
    reader = head
    producer = head.inputs[0].producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        quantize = producer.inputs[0].producer()
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            reader = quantize
    hidden = reader.inputs[0]  # other readers of it (none in trtglm's graphs) keep every position
    reader.replace_input_with(0, _last(model.graph, hidden, 1, "last_position", before=reader))
    _last_layer_on_last_position(model.graph)
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    if logits.shape is not None and logits.shape.rank() == 3:
        logits.shape = ir.Shape([logits.shape[0], 1, logits.shape[2]])
    save_graph(model, onnx_path)
    return head.name


def _last(graph: ir.Graph, value: ir.Value, axis: int, name: str, *, before: ir.Node) -> ir.Value:
    """`value`'s last position along `axis` (a Slice inserted before `before`)."""
    bounds = [add_initializer(graph, np.array([v], np.int64), f"{name}.{what}")
              for what, v in (("starts", -1), ("ends", np.iinfo(np.int64).max), ("axes", axis))]
    last = ir.node("Slice", [value, *bounds], name=name)
    last.outputs[0].name = f"{value.name}.{name}"
    last.outputs[0].type = value.type  # None where the graph has no value info (quantized graphs)
    if value.shape is not None and value.shape.rank() > axis:
        last.outputs[0].shape = ir.Shape([1 if i == axis else d for i, d in enumerate(value.shape)])
    graph.insert_before(before, last)
    return last.outputs[0]


def _last_layer_on_last_position(graph: ir.Graph) -> bool:
    """Slice the last Attention's queries and mask rows and the residual its output is added to (above);
    False, leaving the graph as it is, where that layer is not of that form."""
    attention = [n for n in graph if n.op_type == "Attention"]
    if not attention:
        return False
    node = attention[-1]
    q = node.inputs[0]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    if node.attributes.get_int("is_causal", 0) or q.shape is None or q.shape.rank() != 4:
        return False  # is_causal aligns a one-row query to the first key
    if mask is not None and (mask.shape is None or mask.shape.rank() != 4):
        return False
    residual = _residual_add(node)
    if residual is None:
        return False
    add, other = residual
    h = add.inputs[other]
    if h.shape is None or h.shape.rank() != 3:
        return False
    node.replace_input_with(0, _last(graph, q, 2, "last_layer.query", before=node))
    if mask is not None:  # before the first layer, next to the full mask (cache_window.py slices both there)
        node.replace_input_with(3, _last(graph, mask, 2, "last_layer.mask", before=attention[0]))
    add.replace_input_with(other, _last(graph, h, 1, "last_layer.residual", before=add))
    return True


def _residual_add(attention: ir.Node) -> tuple[ir.Node, int] | None:
    """The Add that puts the attention's output (through o_proj) back on the residual stream, and the index of
    its residual input: the first Add on the single-consumer chain from the attention."""
    value = attention.outputs[0]
    for _ in range(12):
        uses = list(value.uses())
        if len(uses) != 1:
            return None
        consumer, index = uses[0]
        if consumer.op_type == "Add":
            return consumer, 1 - index
        value = consumer.outputs[0]
    return None


def lm_head(graph: ir.Graph) -> ir.Node:
    """The MatMul computing `logits` (through Casts)."""
    outputs = [v for v in graph.outputs if v.name == "logits"]
    node = outputs[0].producer() if outputs else None
    while node is not None and node.op_type in PASS_THROUGH:
        node = node.inputs[0].producer()
    if node is None or node.op_type != "MatMul":
        raise TrtglmError("logits: last needs a graph whose `logits` output is computed by a MatMul (the lm_head)")
    return node

