"""A rotary embedding on keys folded into the projection that computes them.

    h ─ MatMul(W) ─ Add(b) ─ Split ─ k ─ Reshape[B,S,KV,D] ─ Transpose ─ RotaryEmbedding(cos, sin, pos) ─> keys

    ==>  h ─ MatMul([W | Wk·P]) ─ Add([b | bk·P]) ─ Split ─┬─ k ─── Mul(C[pos]) ─┐
                                                           └─ k·P ─ Mul(S[pos]) ─ Add ─ Reshape ─ Transpose ─> keys

P sends every key column to the partner it rotates with (its pair, or its other half for rotate-half), so
k·P comes out of the same GEMM as k; C[pos] and S[pos] are rows of two [max_positions, KV*D] tables (cos;
sin carrying the rotation's sign; 1 and 0 past the rotary dimension), gathered once by position and
shared by every layer. The extra columns are copies of existing weights: the result is exact.

Why: TensorRT-RTX 1.7 cannot build a RotaryEmbedding on keys feeding the KV cache into a fused Attention
(rotary.py), and the decomposed rotation it can build is eleven nodes per layer (slices, a pair reshape,
Neg, Concat, ...). This is three elementwise ops, which engines fuse into the GEMM's epilogue, for
KV*D more GEMM columns. The pass runs after the rotary rules have turned the keys' rotation into a
RotaryEmbedding; one it cannot fold is left as it is and named.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .qkv import bias as _bias
from .rotary import feeds_kv_cache
from .tables import add_initializer
from .tables import const_ints as _ints


def fold_key_rotations(graph: ir.Graph) -> tuple[int, list[str]]:
    """Fold every key RotaryEmbedding. Returns (folds, why each other key rotation was left)."""
    folded, refused, tables = 0, [], {}
    for rope in [n for n in graph if n.op_type == "RotaryEmbedding" and feeds_kv_cache(n.outputs[0])]:
        source = _source(rope)
        if isinstance(source, str):
            refused.append(f"{rope.name}: {source}")
            continue
        _fold(graph, rope, *source, tables)
        folded += 1
    return folded, refused


def _source(rope: ir.Node):
    """(reshape, split or None, output index, matmul, add or None), or why the keys' producer is not one."""
    if len(rope.inputs) != 4 or rope.inputs[3] is None:
        return "no position_ids input"
    if any(v.const_value is None for v in rope.inputs[1:3]):
        return "cos/sin caches are not constants"
    if rope.attributes.get_int("num_heads", 0):
        return "3-D input form"
    transpose = rope.inputs[0].producer()
    if transpose is None or transpose.op_type != "Transpose" or list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return "keys are not transposed from [batch, seq, heads, head_dim]"
    reshape = transpose.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape":
        return "keys are not reshaped from a projection"
    flat, heads = reshape.inputs[0], reshape.outputs[0]
    if flat.shape is None or heads.shape is None or flat.shape.rank() != 3 or heads.shape.rank() != 4 \
            or not all(isinstance(d, int) for d in (flat.shape[2], heads.shape[2], heads.shape[3])) \
            or flat.shape[2] != heads.shape[2] * heads.shape[3]:
        return "the reshape does not split the last axis into [heads, head_dim]"
    if any(len(list(v.uses())) != 1 for v in (flat, heads, transpose.outputs[0])):
        return "the keys before rotation are read elsewhere"
    node, index, split = flat.producer(), 0, None
    if node is not None and node.op_type == "Split":
        split, index = node, list(node.outputs).index(flat)
        axis = node.attributes.get_int("axis", 0)
        if axis not in (-1, 2) or len(node.inputs) < 2 or _ints(node.inputs[1]) is None:
            return "the keys' split is not along the last axis by constant sizes"
        node = node.inputs[0].producer()
    matmul, add = node, None
    if node is not None and node.op_type == "Add":
        matmul = next((v.producer() for v in node.inputs if v.producer() is not None and v.producer().op_type == "MatMul"), None)
        add = node
    if matmul is None or matmul.op_type != "MatMul":
        return "the keys do not come from a MatMul (+ Add) projection"
    w = matmul.inputs[1]
    bias = _bias(matmul, add)
    if w.const_value is None or w.shape.rank() != 2 or (add is not None and (bias is None or bias.const_value is None
                                                                             or bias.shape.rank() != 1)):
        return "the projection's weight or bias is not a constant matrix / vector"
    out = (add or matmul).outputs[0]
    if len(list(out.uses())) != 1 or out.is_graph_output() or len(list(matmul.outputs[0].uses())) != 1:
        return "the projection's output is read elsewhere"
    return reshape, split, index, matmul, add


def _fold(graph: ir.Graph, rope: ir.Node, reshape: ir.Node, split: ir.Node | None, index: int, matmul: ir.Node,
          add: ir.Node | None, tables: dict) -> None:
    heads, head_dim = reshape.outputs[0].shape[2], reshape.outputs[0].shape[3]
    width = heads * head_dim
    sizes = _ints(split.inputs[1]) if split is not None else [matmul.inputs[1].shape[1]]
    start = sum(sizes[:index])
    rot = rope.attributes.get_int("rotary_embedding_dim", 0) or head_dim
    interleaved = bool(rope.attributes.get_int("interleaved", 0))
    partner, sign = _partners(head_dim, rot, interleaved)
    columns = np.concatenate([h * head_dim + partner for h in range(heads)]) + start

    w, bias = matmul.inputs[1], _bias(matmul, add)
    tape = ir.tape.Tape()
    new_w = _constant(graph, np.concatenate([w.const_value.numpy(), w.const_value.numpy()[:, columns]], axis=1), w.name, w)
    projected = tape.op("MatMul", [matmul.inputs[0], new_w])
    if add is not None:
        b = bias.const_value.numpy()
        projected = tape.op("Add", [projected, _constant(graph, np.concatenate([b, b[columns]]), bias.name, bias)])
    sizes_out = _constant(graph, np.array(sizes + [width], np.int64), f"{w.name}.split")
    outs = tape.op_multi_out("Split", [projected, sizes_out], attributes={"axis": -1}, num_outputs=len(sizes) + 1)
    cos, sin = _tables(graph, tape, rope, heads, head_dim, rot, interleaved, sign, tables)
    keys = tape.op("Add", [tape.op("Mul", [outs[index], cos]), tape.op("Mul", [outs[-1], sin])])
    keys = tape.op("Transpose", [tape.op("Reshape", [keys, reshape.inputs[1]])], attributes={"perm": [0, 2, 1, 3]})
    graph.insert_after(rope, tape.nodes)

    old_outs = list(split.outputs) if split is not None else [(add or matmul).outputs[0]]
    for old, new in zip(old_outs, outs):
        new.shape, new.type = old.shape, old.type
        if old is not reshape.inputs[0]:
            ir.convenience.replace_all_uses_with(old, new)
    keys.shape, keys.type = rope.outputs[0].shape, rope.outputs[0].type
    ir.convenience.replace_all_uses_with(rope.outputs[0], keys)
    transpose = rope.inputs[0].producer()
    graph.remove([n for n in (rope, transpose, reshape, split, add, matmul) if n is not None], safe=True)


def _partners(head_dim: int, rot: int, interleaved: bool) -> tuple[np.ndarray, np.ndarray]:
    """For each column of a head: the column it rotates with, and the sign sin takes there
    (y[i] = x[i] cos - x[j] sin for the first of a pair, + for the second; identity past `rot`)."""
    partner, sign = np.arange(head_dim), np.zeros(head_dim, np.float64)
    first = np.arange(0, rot, 2) if interleaved else np.arange(rot // 2)
    second = first + 1 if interleaved else first + rot // 2
    partner[first], partner[second] = second, first
    sign[first], sign[second] = -1.0, 1.0
    return partner, sign


def _tables(graph, tape, rope, heads, head_dim, rot, interleaved, sign, cache) -> tuple[ir.Value, ir.Value]:
    """C[pos] and S[pos], [batch, seq, heads*head_dim], made once per (caches, layout) and shared (the rotary
    rule gives every layer the same cache values; equal tables from elsewhere are merged by _tidy's passes)."""
    cos_cache, sin_cache, positions = rope.inputs[1], rope.inputs[2], rope.inputs[3]
    key = (cos_cache, sin_cache, positions, heads, head_dim, rot, interleaved)
    if key not in cache:
        c, s = cos_cache.const_value.numpy(), sin_cache.const_value.numpy()
        frequency = (np.arange(rot) // 2) if interleaved else (np.arange(rot) % (rot // 2))
        full_c = np.ones((c.shape[0], head_dim), c.dtype)
        full_s = np.zeros((c.shape[0], head_dim), c.dtype)
        full_c[:, :rot] = c[:, frequency]
        full_s[:, :rot] = s[:, frequency] * sign[:rot].astype(c.dtype)
        cache[key] = tuple(
            tape.op("Gather", [_constant(graph, np.tile(t, (1, heads)), f"rotary_keys.{name}_table"), positions],
                    attributes={"axis": 0})
            for t, name in ((full_c, "cos"), (full_s, "sin")))
    return cache[key]


def _constant(graph: ir.Graph, array: np.ndarray, name: str, replaces: ir.Value | None = None) -> ir.Value:
    """A new initializer; it takes the name of the one it `replaces` (renamed, soon unused), else a free name."""
    if replaces is not None and graph.initializers.get(replaces.name) is replaces and len(list(replaces.uses())) == 1:
        graph.initializers.pop(replaces.name)
        replaces.name = f"{name}.before_key_fold"
    base, n = name, 0
    while name in graph.initializers:
        n += 1
        name = f"{base}.{n}"
    return add_initializer(graph, array, name)
