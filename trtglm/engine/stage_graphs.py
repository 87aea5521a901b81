"""Cut a decoder graph into stages: consecutive layer ranges, each a graph of its own.

    whole:   input_ids ─ embed ─ layers 0..L-1 ─ norm ─ lm_head ─ logits          (+ every layer's KV cache)
    stages:  input_ids ─ embed ─ layers 0..a-1 ─ hidden.a                          (+ the KV cache of 0..a-1)
             hidden.a ─ layers a..b-1 ─ hidden.b                                   (+ the KV cache of a..b-1)
             hidden.b ─ layers b..L-1 ─ norm ─ lm_head ─ logits                    (+ the KV cache of b..L-1)

A node belongs to the layer of the checkpoint weights it reads (`...layers.N....`), or else to the latest layer
its inputs come from; nodes that read no weight of their own move forward to the next layer where that passes
fewer values from one layer to the next (a minimum cut: the unfused RMS norm that starts a layer, the residual
slice of the last layer), so a cut passes only the residual stream, of the exported graph as of the fused one. Later stages read the sequence's shape from their hidden states instead of `input_ids`. What depends on
no weight at all (the attention mask, position tables) is computed again in every stage that needs it. Each
stage keeps the mask, positions and cache inputs it reads, and its weights go to its own data file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import TrtglmError
from ..core.graphs import save_streaming

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
ONNX_FILE, DATA_FILE = "model.onnx", "model.onnx.data"


def layer_of(name: str) -> int | None:
    match = LAYER.search(name)
    return int(match.group(1)) if match else None


def boundary_name(layer: int, index: int) -> str:
    """The tensor a cut before `layer` passes: the residual stream (`hidden.<layer>`), and any others after it."""
    return f"hidden.{layer}" + (f".{index}" if index else "")


@dataclass(frozen=True)
class LayerMap:
    """Where each node of a decoder graph runs, and the weights each layer and the two ends hold."""

    layers: int
    place: dict  # node -> layer (None: reads no weight; computed wherever it is needed)
    layer_bytes: list[int]  # the weights of each layer
    head_bytes: int  # weights read before layer 0 (the embedding)
    tail_bytes: int  # weights read after layer L-1 (the final norm, lm_head)

    def boundary(self, model, layer: int) -> list:
        """The values a cut before `layer` passes from the stage before it to the stage after it."""
        out = []
        for node in model.graph:
            p = self.place[node]
            if p is None or p >= layer:
                continue
            for value in node.outputs:
                if any(self.place[c] is not None and self.place[c] >= layer for c in value.consumers()):
                    out.append(value)
        return out


def map_layers(model) -> LayerMap:
    """Places every node of `model` (onnx-ir, in topological order) in a layer."""
    graph = model.graph
    depth: dict[object, int | None] = {v: layer_of(v.name) for v in graph.initializers.values()}
    asap: dict = {}
    anchored: set = set()
    for node in graph:
        own = [layer_of(v.name) for v in node.inputs if v is not None and v.is_initializer()]
        if any(d is not None for d in own):
            anchored.add(node)
        depths = [depth.get(v) for v in node.inputs if v is not None]
        d = max((x for x in depths if x is not None), default=None)
        asap[node] = d
        for value in node.outputs:
            depth[value] = d
    layers = 1 + max((d for d in asap.values() if d is not None), default=-1)
    if layers == 0:
        raise TrtglmError("the graph has no weights named by layer (`layers.N.`): it cannot be cut into stages")
    place = _forward(graph, asap, anchored, layers)
    layer_bytes, head, tail = [0] * layers, 0, 0
    for value in graph.initializers.values():
        size = value.const_value.nbytes if value.const_value is not None else 0
        layer = layer_of(value.name)
        if layer is not None and layer < layers:
            layer_bytes[layer] += size
            continue
        consumers = [place[c] for c in value.consumers()]
        if any(p is not None for p in consumers):
            tail += size  # read by the final norm or lm_head (after the last layer)
        else:
            head += size  # the embedding, and tables every stage may read
    return LayerMap(layers, place, layer_bytes, head, tail)


def _forward(graph, asap: dict, anchored: set, layers: int) -> dict:
    """`asap` with weight-less nodes moved forward one layer where that passes fewer values, or as few, from
    layer l-1 to layer l: for each l, the minimum cut between the nodes that must stay (they read layer l-1's
    weights, or give a graph output) and layer l's nodes, counting each value that crosses once."""
    import networkx as nx

    place = dict(asap)
    for layer in range(1, layers):
        stay = [n for n in graph if asap[n] == layer - 1]
        flow = nx.DiGraph()
        for node in stay:
            if node in anchored or any(v.is_graph_output() for v in node.outputs):
                flow.add_edge("before", node)  # no capacity: cannot be cut
            for v in node.outputs:
                for c in v.consumers():
                    if asap[c] is None:
                        continue
                    if asap[c] >= layer:
                        flow.add_edge(c, "after")
                    flow.add_edge(node, v, capacity=1)  # a value crosses once, whatever reads it after the cut
                    flow.add_edge(v, c)
                    flow.add_edge(c, node)  # a consumer cannot run before its producer
            for v in node.inputs:
                p = v.producer() if v is not None else None
                if p is not None and asap[p] is not None and asap[p] < layer - 1:
                    flow.add_edge("before", p)
                    flow.add_edge(p, v, capacity=1)
                    flow.add_edge(v, node)
        if "before" not in flow or "after" not in flow:
            continue
        _, (_, moved) = nx.minimum_cut(flow, "before", "after")
        for node in stay:
            if node in moved:
                place[node] = layer
    return place


@dataclass(frozen=True)
class StageGraph:
    index: int
    layers: tuple[int, int]  # first, end (exclusive)
    path: Path  # its model.onnx
    inputs: list[str]
    outputs: list[str]
    weight_bytes: int

    def to_dict(self) -> dict:
        return {"index": self.index, "layers": list(self.layers), "dir": self.path.parent.name,
                "inputs": self.inputs, "outputs": self.outputs, "weight_bytes": self.weight_bytes}


@dataclass(frozen=True)
class Cut:
    """Where a graph is cut: the layers of each stage and the values each cut passes (names in `source`). A
    passed value whose type the graph does not record is [batch, sequence, hidden_size] in the KV cache's dtype."""

    source: Path
    ranges: list[tuple[int, int]]
    crossing: dict[int, list[str]]  # first layer of a stage -> the values passed into it
    hidden_size: int

    def stage(self, index: int):
        """Stage `index` as an onnx-ir model, its weights still mapped from the source's data file."""
        first, end = self.ranges[index]
        return _stage(self.source, (first, end), self.crossing.get(first, []), self.crossing.get(end, []),
                      self.hidden_size)


def plan_cut(onnx_path: Path, ranges: list[tuple[int, int]], hidden_size: int) -> Cut:
    """The cut of `onnx_path` into the layer ranges `ranges`, checked: they cover the layers in order, and each
    cut passes something from one stage to the next."""
    import onnx_ir as ir

    model = ir.load(onnx_path)
    model.graph.sort()
    layer_map = map_layers(model)
    if ranges[0][0] != 0 or ranges[-1][1] != layer_map.layers or any(
            a[1] != b[0] or a[0] >= a[1] for a, b in zip(ranges, ranges[1:])) or ranges[-1][0] >= ranges[-1][1]:
        raise TrtglmError(f"stages {ranges} do not cover layers 0..{layer_map.layers - 1} in order")
    crossing = {a: [v.name for v in layer_map.boundary(model, a)] for a, _ in ranges[1:]}
    for layer, values in crossing.items():
        if not values:
            raise TrtglmError(f"nothing flows from layer {layer - 1} to layer {layer}: not a decoder graph")
    return Cut(Path(onnx_path), list(ranges), crossing, hidden_size)


def write_stage(model, out_dir: Path, index: int, layers: tuple[int, int]) -> StageGraph:
    """Save a stage's model as `out_dir/model.onnx` with its own data file."""
    graph = model.graph
    weight_bytes = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
    out_dir.mkdir(parents=True)
    save_streaming(model, out_dir / ONNX_FILE, DATA_FILE)
    return StageGraph(index, layers, out_dir / ONNX_FILE, [v.name for v in graph.inputs],
                      [v.name for v in graph.outputs], weight_bytes)


def _stage(onnx_path: Path, layers: tuple[int, int], entering: list[str], leaving: list[str], hidden_size: int):
    import onnx_ir as ir

    model = ir.load(onnx_path)
    graph = model.graph
    graph.sort()
    layer_map = map_layers(model)
    first, end = layers
    values = {v.name: v for node in graph for v in node.outputs}
    outputs = [v for v in graph.outputs if v.producer() is not None
               and first <= (layer_map.place[v.producer()] or 0) < end]
    cache = next(v for v in graph.inputs if v.name.startswith("past_key_values."))

    def shape(value) -> ir.Shape:  # [batch, sequence, width], named as the graph's inputs name them
        width = value.shape[-1] if value.shape is not None and isinstance(value.shape[-1], int) else hidden_size
        return ir.Shape(["batch", "sequence", width])

    for j, name in enumerate(leaving):
        value = values[name]
        value.name = boundary_name(end, j)
        value.type, value.shape = value.type or cache.type, shape(value)
        outputs.append(value)
    new_inputs = []
    for j, name in enumerate(entering):
        old = values[name]
        new = ir.Value(name=boundary_name(first, j), type=old.type or cache.type, shape=shape(old))
        for node, i in list(old.uses()):
            if layer_map.place[node] is not None and layer_map.place[node] >= first:
                node.replace_input_with(i, new)
        new_inputs.append(new)
    needed, stack = set(), [v.producer() for v in outputs if v.producer() is not None]
    while stack:  # the nodes this stage's outputs depend on, back to its inputs
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    if first > 0:
        _shapes_from_hidden(graph, needed, new_inputs[0])
    read = {v for node in needed for v in node.inputs if v is not None}
    kept_inputs = [v for v in graph.inputs if v in read]
    for node in [n for n in graph if n not in needed]:
        graph.remove(node, safe=False)
    graph.inputs.clear()
    graph.inputs.extend(kept_inputs + new_inputs)
    graph.outputs.clear()
    graph.outputs.extend(outputs)
    for name in [n for n, v in graph.initializers.items() if v not in read]:
        del graph.initializers[name]
    return model


def _shapes_from_hidden(graph, needed: set, hidden) -> None:
    """A later stage has no `input_ids`: its `Shape(input_ids)` nodes ([B, S], or part) read the hidden states
    [B, S, H] instead, cut to the same dimensions."""
    import onnx_ir as ir

    ids = next((v for v in graph.inputs if v.name == "input_ids"), None)
    if ids is None:
        return
    for node, i in list(ids.uses()):
        if node not in needed:
            continue
        if node.op_type != "Shape":
            raise TrtglmError(f"{node.name} ({node.op_type}) reads input_ids after layer 0: the graph cannot be cut")
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", 2)
        start, end = (start + 2 if start < 0 else start), min(end + 2 if end < 0 else end, 2)
        node.replace_input_with(i, hidden)
        node.attributes["start"] = ir.AttrInt64("start", start)
        node.attributes["end"] = ir.AttrInt64("end", end)
