"""Evaluate the part of a graph that depends only on one input (position_ids -> cos/sin tables); read constants."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir


def add_initializer(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    """`array` as a new initializer of `graph` named `name`."""
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape),
                     const_value=ir.tensor(np.asarray(array, order="C"), name=name))  # keeps a scalar 0-d
    graph.register_initializer(value)
    return value


def const_ints(value: ir.Value | None) -> list[int] | None:
    """A constant's values as a flat list of ints (None when not a constant)."""
    if value is None or value.const_value is None:
        return None
    return [int(i) for i in np.asarray(value.const_value.numpy()).reshape(-1)]


def ancestors(value: ir.Value) -> tuple[list[ir.Node], set[ir.Value]]:
    """Nodes computing `value` (in graph order) and the graph inputs they read (initializers excluded)."""
    nodes, inputs, stack, seen = [], set(), [value], set()
    while stack:
        v = stack.pop()
        if v is None or v in seen:
            continue
        seen.add(v)
        node = v.producer()
        if node is None:
            if v.const_value is None:
                inputs.add(v)
            continue
        nodes.append(node)
        stack.extend(node.inputs)
    graph = value.graph or next(iter(nodes)).graph
    order = {n: i for i, n in enumerate(graph)}
    return sorted(set(nodes), key=order.__getitem__), inputs


def evaluate(outputs: list[ir.Value], feeds: dict[ir.Value, np.ndarray], opset: int) -> list[np.ndarray]:
    """Run the nodes computing `outputs` on `feeds` in ONNX Runtime (constants included)."""
    import onnxruntime as ort

    nodes: list[ir.Node] = []
    for out in outputs:
        nodes += [n for n in ancestors(out)[0] if n not in nodes]
    graph = nodes[0].graph
    order = {n: i for i, n in enumerate(graph)}
    nodes.sort(key=order.__getitem__)
    consts = {v for n in nodes for v in n.inputs if v is not None and v.producer() is None and v.const_value is not None}
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes], "tables",
            [onnx.helper.make_tensor_value_info(v.name, v.dtype.value, None) for v in feeds],
            [onnx.helper.make_tensor_value_info(v.name, v.dtype.value, None) for v in outputs],
            initializer=[ir.serde.serialize_tensor(v.const_value) for v in consts]),
        opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=10)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run([v.name for v in outputs], {v.name: a for v, a in feeds.items()})
