"""ONNX Runtime's attention over a static KV cache reads only the slots a step can see.

    present [B,KV,M,D] ─────────────────────────────── Attention(q, k, v, mask [B,1,S,M])
    ==>
    present [B,KV,M,D] ─ Slice(axis 2, 0:used) ─┐
    static_mask [B,1,S,M] ─ Slice(axis 3, 0:used) ─ Attention(q, k, v, mask [B,1,S,used])

    used = max(cache_position) + S: the slot after the last new token of the longest row

Query s of row b sits at slot cache_position[b]+s < used and sees no slot after its own (static_cache.py),
so the slots cut off are masked for every query: the attention is the same, over the filled part of the
cache instead of all M slots (a 512-token prefill into 2048 slots computed 4x the scores it needed).
TensorRT's graph keeps every slot (fixed shapes, the KV-cache-update layer in place); the ONNX Runtime
backend applies this in memory when it loads a static-cache graph.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir

from ..engine.static_cache import CACHE_POSITION


def window(model: ir.Model) -> int:
    """Slice the cache and mask inputs of every Attention over a static cache, in place; how many."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    if CACHE_POSITION not in inputs:
        return 0
    attention = [n for n in graph if n.op_type == "Attention" and len(n.inputs) > 3
                 and all(v is not None and v.producer() is not None and v.producer().op_type == "TensorScatter"
                         for v in n.inputs[1:3])]
    if not attention:
        return 0
    nodes: list[ir.Node] = []
    names = itertools.count()

    def op(op_type: str, *args: ir.Value, **attributes) -> ir.Value:
        node = ir.node(op_type, list(args), attributes=attributes or None, name=f"cache_window.{next(names)}")
        nodes.append(node)
        return node.outputs[0]

    def insert_before(node: ir.Node) -> None:
        for n in nodes:
            graph.insert_before(node, n)
        nodes.clear()

    def const(array: np.ndarray) -> ir.Value:
        return op("Constant", value=ir.tensor(array))

    zero, axis2, axis3 = const(np.array([0], np.int64)), const(np.array([2], np.int64)), const(np.array([3], np.int64))
    # the new tokens' count from position_ids [B, S], which every stage of a staged build has (as static_cache.py)
    used = op("Add", op("ReduceMax", inputs[CACHE_POSITION], keepdims=1),
              op("Shape", inputs["position_ids"], start=1, end=2))
    masks = {mask: op("Slice", mask, zero, used, axis3) for mask in dict.fromkeys(n.inputs[3] for n in attention)}
    insert_before(attention[0])  # the masks are computed before the first layer
    for node in attention:
        node.replace_input_with(1, op("Slice", node.inputs[1], zero, used, axis2))
        node.replace_input_with(2, op("Slice", node.inputs[2], zero, used, axis2))
        node.replace_input_with(3, masks[node.inputs[3]])
        insert_before(node)
    return len(attention)
