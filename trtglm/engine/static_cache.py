"""A static KV cache (`shapes.kv_cache: static`): fixed [B, KV, max_seq_len, D] buffers updated in place.

    past [B,KV,P,D] ─ Concat(k, axis 2) ─> present [B,KV,P+S,D] ─ Attention(mask from attention_mask [B,P+S])
    ==>
    past [B,KV,M,D] ─ TensorScatter(k, cache_position) ─> present [B,KV,M,D] ─ Attention(mask [B,1,S,M])

    cache_position [B] int64: the slot of each row's first new token (how many tokens are cached already)
    attention_mask [B,M]: 1 for every slot that holds a real token (cached or new), 0 for padding and empty slots

Query s of row b sits at slot cache_position[b]+s and sees every slot up to it that is not padding, and
itself (the rule of the dynamic graph, `graph._attention_bias`); slots past it are empty or stale and never
seen. TensorScatter (opset 24) is TensorRT's KV-cache-update layer: `present` is the same memory as `past`,
so a decode step copies no cache and has the same shapes every step (what CUDA graph capture needs).
ONNX Runtime computes the same; its backend binds `present` to `past`'s buffer.

Only the graph changes; the weights file is left as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as passes

from ..core.errors import TrtglmError
from ..core.graphs import save_graph

CACHE_POSITION = "cache_position"
OPSET = 24  # TensorScatter


def step_inputs(attention_mask: np.ndarray, cached: int, slots: int) -> dict[str, np.ndarray]:
    """What a static-cache graph reads for one step, from the generation loop's mask over the cached and new
    tokens [B, cached+S]: that mask over all slots, and where the new tokens go (both runtimes use this)."""
    batch, total = attention_mask.shape
    if total > slots:
        raise TrtglmError(f"{total} tokens do not fit the static KV cache's {slots} slots")
    mask = np.zeros((batch, slots), np.int64)
    mask[:, :total] = attention_mask
    return {"attention_mask": mask, CACHE_POSITION: np.full(batch, cached, np.int64)}


def make_static(onnx_path: Path, max_seq_len: int) -> int:
    """Rewrite `onnx_path` (its graph only) to a static cache of `max_seq_len` slots; returns the layers."""
    model = ir.load(onnx_path)
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    if CACHE_POSITION in inputs:
        raise TrtglmError(f"{onnx_path}: the graph has a static KV cache already")
    attention = [n for n in graph if n.op_type == "Attention"]
    concats = [n for n in graph if n.op_type == "Concat" and n.outputs[0].is_graph_output()
               and n.inputs[0] is not None and n.inputs[0].name.startswith("past_key_values.")]
    if not attention or len(concats) != 2 * len(attention):
        raise TrtglmError("kv_cache: static needs the attention fusion (one Attention per layer reading the "
                          f"KV-cache Concat); this graph has {len(attention)} Attention and {len(concats)} cache Concat "
                          "nodes", hint="build with the default fusions, or --kv-cache dynamic")
    masks = {n.inputs[3] for n in attention if len(n.inputs) > 3}
    if len(masks) != 1 or next(iter(masks)) is None or next(iter(masks)).dtype not in (None, ir.DataType.BOOL):
        raise TrtglmError("kv_cache: static needs the attention layers to share one boolean mask",
                          hint="build with the default fusions, or --kv-cache dynamic")

    position = ir.Value(name=CACHE_POSITION, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch"]))
    graph.inputs.append(position)
    ids = inputs["position_ids"]  # every stage of a staged build has it; input_ids only the first
    batch = ids.shape[0] if ids.shape is not None else "batch"
    inputs["attention_mask"].shape = ir.Shape([batch, max_seq_len])
    for concat in concats:
        past, new = concat.inputs[0], concat.inputs[1]
        if concat.attributes.get_int("axis") not in (2, -2):
            raise TrtglmError(f"{concat.name}: the KV cache is not concatenated along the sequence axis")
        scatter = ir.node("TensorScatter", [past, new, position], attributes={"axis": 2, "mode": "linear"},
                          name=f"{concat.name}.static")
        graph.insert_before(concat, scatter)
        present, out = concat.outputs[0], scatter.outputs[0]
        dims = list(present.shape) if present.shape is not None else [batch, None, None, None]
        dims[2] = max_seq_len
        past.shape = out.shape = ir.Shape(dims)
        out.type = present.type
        present.replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(concat, safe=True)
        out.name = present.name

    mask = _mask(graph, inputs["position_ids"], inputs["attention_mask"], position, max_seq_len, before=attention[0])
    for node in attention:
        node.replace_input_with(3, mask)
    model.opset_imports[""] = max(model.opset_imports.get("", OPSET), OPSET)
    passes.RemoveUnusedNodesPass()(model)  # the dynamic mask's subgraph
    save_graph(model, onnx_path)
    return len(attention)


def _mask(graph: ir.Graph, tokens: ir.Value, attention_mask: ir.Value, position: ir.Value, slots: int,
          before: ir.Node) -> ir.Value:
    """allowed [B,1,S,M] = slot <= query's slot and (slot is a real token or the query itself); `tokens` [B,S]
    (position_ids) gives S."""
    from ..fusion.tables import (
        add_initializer,  # not at the top: the runtime imports this module, not onnxscript
    )

    nodes: list[ir.Node] = []

    def op(op_type: str, *args: ir.Value, **attributes) -> ir.Value:
        node = ir.node(op_type, list(args), attributes=attributes or None, name=f"static_mask.{len(nodes)}")
        nodes.append(node)
        return node.outputs[0]

    def const(name: str, array: np.ndarray) -> ir.Value:
        return add_initializer(graph, array, f"static_mask.{name}")

    slot = const("slots", np.arange(slots, dtype=np.int64).reshape(1, 1, 1, slots))
    seq = op("Squeeze", op("Shape", tokens, start=1, end=2), const("axis0", np.array([0], np.int64)))
    offsets = op("Range", const("zero", np.array(0, np.int64)), seq, const("one", np.array(1, np.int64)))
    query = op("Add", op("Reshape", position, const("rows", np.array([-1, 1, 1, 1], np.int64))),
               op("Reshape", offsets, const("columns", np.array([1, 1, -1, 1], np.int64))))  # [B,1,S,1]
    real = op("Unsqueeze", op("Cast", attention_mask, to=ir.DataType.BOOL), const("axes12", np.array([1, 2], np.int64)))
    allowed = op("And", op("LessOrEqual", slot, query), op("Or", real, op("Equal", slot, query)))
    for node in nodes:
        graph.insert_before(before, node)
    allowed.name = "static_mask"
    dims = tokens.shape if tokens.shape is not None and tokens.shape.rank() == 2 else ["batch", "sequence"]
    allowed.type, allowed.shape = ir.TensorType(ir.DataType.BOOL), ir.Shape([dims[0], 1, dims[1], slots])
    return allowed
