"""GLM rotary embedding (partial, interleaved) and the rotate-half layout -> RotaryEmbedding (opset 23).

    x [B,H,S,D] ─ Slice[:rot] ─ x_rot ─┬──────────────── Mul(cos) ──┐
                                        └─ rotate(x_rot) ─ Mul(sin) ─ Add ─ Concat(-1) ─> y
                └─ Slice[rot:] ─────────────────────────────────────────────┘   (no Slice/Concat when rot = D)

    rotate, interleaved:  Reshape[..,rot/2,2] ─ Split ─ (x1, x2) ─ Concat(-x2, x1) ─ Reshape[..,rot]
                     or   Slice[0::2], Slice[1::2] ─ Unsqueeze ─ Concat(-x2, x1) ─ Reshape   (torch.stack form)
    rotate, half:         Slice[:rot/2], Slice[rot/2:] ─ Concat(-x2, x1)

    ==>  RotaryEmbedding(x, cos_cache, sin_cache, position_ids, interleaved, rotary_embedding_dim=rot)

cos and sin may be computed any way from position_ids alone (other inputs only through their Shape, as
torch's dynamo exporter reads dynamic dimensions): the check evaluates that subgraph for the rows of
positions 0..max_positions-1 and max_positions-1..0, and accepts it only if each row's table is its own
positions' and a rotary table (each frequency repeated in pairs, or in halves for rotate-half, and
cos^2 + sin^2 = 1). The resulting [max_positions, rot/2] caches are shared by
every layer.

With keys=False only queries are fused: TensorRT-RTX 1.7 fails inside Myelin ("ssa.cpp CHECK
failed ... proxy-HOST") building any profile with a non-empty past when a RotaryEmbedding output
is concatenated onto the KV cache and read by a fused Attention (queries are fine, and so are keys
when attention is not fused). Variants tried on the keys, all failing the same way: the 3-D input form
(num_heads, before the head transpose), full-width tables (cos 1 / sin 0 past the rotary dimension,
rotary_embedding_dim 0), cos/sin gathered per position outside the op (no position_ids input), and
one profile instead of two.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from .tables import ancestors, evaluate
from .tables import const_ints as _ints


class Rotary(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, rotate: str, partial: bool, max_positions: int, opset: int, keys: bool):
        super().__init__(name)
        self.rotate, self.partial, self.keys = rotate, partial, keys
        self.max_positions, self.opset = max_positions, opset
        self._caches: dict[tuple, tuple[ir.Value, ir.Value]] = {}

    def pattern(self, op, x, cos, sin, rot_start, rot_end, rot_axis, pass_start, pass_end, pass_axis,
                pair_shape, merged_shape, split_sizes, s1, e1, a1, st1, s2, e2, a2, st2):
        x_rot = op.Slice(x, rot_start, rot_end, rot_axis, _allow_other_inputs=True) if self.partial else x
        if self.rotate == "pairs":
            x1, x2 = op.Split(op.Reshape(x_rot, pair_shape), split_sizes, axis=-1, _outputs=2)
            rotated = op.Reshape(op.Concat(op.Neg(x2), x1, axis=-1), merged_shape)
        elif self.rotate == "strided":
            x1 = op.Slice(x_rot, s1, e1, a1, st1)
            x2 = op.Slice(x_rot, s2, e2, a2, st2)
            rotated = op.Reshape(op.Concat(op.Unsqueeze(op.Neg(x2), [-1]), op.Unsqueeze(x1, [-1]), axis=-1),
                                 merged_shape)
        else:  # half
            x1 = op.Slice(x_rot, s1, e1, a1, _allow_other_inputs=True)
            x2 = op.Slice(x_rot, s2, e2, a2, _allow_other_inputs=True)
            rotated = op.Concat(op.Neg(x2), x1, axis=-1)
        out = op.Add(op.Mul(x_rot, cos), op.Mul(rotated, sin))
        if not self.partial:
            return out
        return op.Concat(out, op.Slice(x, pass_start, pass_end, pass_axis, _allow_other_inputs=True), axis=-1)

    def check(self, context, x, cos, sin, **v):
        result = pattern.MatchResult()
        if x.shape is None or x.shape.rank() != 4 or not isinstance(x.shape[3], int):
            return result.fail("input is not a 4-D [batch, heads, seq, head_dim] tensor with a known head_dim", x)
        head_dim = x.shape[3]
        rot = head_dim
        if self.partial:
            starts, ends, axes = (_ints(v[k]) for k in ("rot_start", "rot_end", "rot_axis"))
            p_starts, p_ends, p_axes = (_ints(v[k]) for k in ("pass_start", "pass_end", "pass_axis"))
            if None in (starts, ends, axes, p_starts, p_ends, p_axes):
                return result.fail("slice bounds are not constants")
            if axes[0] not in (-1, 3) or p_axes[0] not in (-1, 3) or starts[0] != 0:
                return result.fail("the rotated part is not a leading slice of the last axis")
            rot = ends[0]
            if p_starts[0] != rot or p_ends[0] < head_dim:
                return result.fail(f"the pass-through slice does not start at the rotary dimension {rot}")
        elif x.producer() is not None and x.producer().op_type == "Slice":
            return result.fail("input is a slice of a wider tensor: the partial-rotation rule applies", x)
        if rot % 2 or not 0 < rot <= head_dim:
            return result.fail(f"rotary dimension {rot} is not even and within head_dim {head_dim}")
        if self.rotate == "pairs":
            pair_shape, sizes = _ints(v["pair_shape"]), _ints(v["split_sizes"])
            if pair_shape is None or pair_shape[-1] != 2 or sizes != [1, 1]:
                return result.fail("x is not split into (even, odd) pairs: not the interleaved layout")
        elif self.rotate == "strided":
            if _ints(v["st1"]) != [2] or _ints(v["st2"]) != [2] or _ints(v["s1"]) != [0] or _ints(v["s2"]) != [1]:
                return result.fail("x is not sliced into [0::2] and [1::2]: not the interleaved layout")
        else:
            if _ints(v["s1"]) != [0] or _ints(v["e1"]) != [rot // 2] or _ints(v["s2"]) != [rot // 2]:
                return result.fail("x is not split into halves: not the rotate-half layout")
        if not self.keys and feeds_kv_cache(context.output_values[0]):
            return result.fail("key rotation left unfused (rotary_keys is off: TensorRT-RTX cannot build a "
                               "RotaryEmbedding feeding the KV cache into a fused Attention)")
        if cos.dtype != x.dtype or sin.dtype != x.dtype:
            return result.fail("cos/sin dtype differs from the input's", [cos, sin])
        tables = self._tables(cos, sin, rot)
        if isinstance(tables, str):
            return result.fail(tables, [cos, sin])
        self._pending = (tables, rot)
        return result

    def _tables(self, cos: ir.Value, sin: ir.Value, rot: int):
        """[max_positions, rot/2] cos and sin caches, or the reason they cannot be had."""
        nodes_c, inputs_c = ancestors(cos)
        nodes_s, inputs_s = ancestors(sin)
        inputs, nodes = inputs_c | inputs_s, set(nodes_c) | set(nodes_s)
        # inputs read only through Shape (an exporter's dynamic dims, e.g. the batch size taken off the KV cache)
        shape_only = {i for i in inputs if all(u.node.op_type == "Shape" for u in i.uses() if u.node in nodes)}
        if len(inputs - shape_only) != 1:
            return f"cos/sin depend on {sorted(i.name for i in inputs - shape_only)}, not on position_ids alone"
        (position_ids,) = inputs - shape_only
        if position_ids.dtype not in (ir.DataType.INT64, ir.DataType.INT32) or position_ids.shape is None \
                or position_ids.shape.rank() != 2:
            return f"cos/sin come from {position_ids.name}, which is not [batch, seq] integer positions"
        key = (cos, sin)
        if key in self._caches:
            return self._caches[key]
        # rows of positions 0..P-1 and P-1..0: a table is a function of each position, whatever the row
        rows = position_ids.shape[0] if isinstance(position_ids.shape[0], int) else 2
        ramp = np.arange(self.max_positions, dtype=position_ids.dtype.numpy())
        positions = np.stack([ramp if r % 2 == 0 else ramp[::-1] for r in range(rows)])
        feeds = {position_ids: positions}
        for value in shape_only:
            if value.shape is None:
                return f"cos/sin read the shape of {value.name}, which is unknown"
            feeds[value] = np.zeros(_stand_in_shape(value.shape, position_ids.shape, positions.shape),
                                    value.dtype.numpy())
        try:
            c, s = evaluate([cos, sin], feeds, self.opset)
        except Exception as e:  # noqa: BLE001 - any failure means "not a table we understand"
            return f"cos/sin could not be evaluated from position_ids ({e})"
        c, s = c.astype(np.float32), s.astype(np.float32)
        if c.size != positions.size * rot or c.shape[-1] != rot:
            return f"cos table has shape {list(c.shape)}, expected [{rows}, .., {self.max_positions}, {rot}]"
        c, s = c.reshape(rows, self.max_positions, rot), s.reshape(rows, self.max_positions, rot)
        if not all(np.allclose(t[r], t[0] if r % 2 == 0 else t[0][::-1], atol=1e-6) for t in (c, s)
                   for r in range(rows)):
            return "cos/sin of a row are not its own positions' (they mix the batch's rows)"
        c, s = c[0], s[0]
        halves = (c[:, 0::2], c[:, 1::2], s[:, 0::2], s[:, 1::2]) if self.rotate != "half" else \
            (c[:, : rot // 2], c[:, rot // 2:], s[:, : rot // 2], s[:, rot // 2:])
        if not (np.array_equal(halves[0], halves[1]) and np.array_equal(halves[2], halves[3])):
            return "cos/sin tables are not repeated per rotated pair"
        if not np.allclose(halves[0] ** 2 + halves[2] ** 2, 1.0, atol=1e-2):
            return "cos^2 + sin^2 != 1: not a rotary table"
        self._caches[key] = (halves[0], halves[2], position_ids)
        return self._caches[key]

    def rewrite(self, op, x, **_):
        (cos_cache, sin_cache, position_ids), rot = self._pending
        dtype = x.dtype.numpy()
        return op.RotaryEmbedding(
            x, op.Constant(value=ir.tensor(cos_cache.astype(dtype))), op.Constant(value=ir.tensor(sin_cache.astype(dtype))),
            position_ids, interleaved=int(self.rotate != "half"),
            rotary_embedding_dim=0 if rot == x.shape[3] else rot)


def _stand_in_shape(shape: ir.Shape, positions: ir.Shape, fed: tuple[int, int]) -> tuple[int, ...]:
    """The shape of an input whose shape alone feeds cos/sin, for evaluating them over the positions fed:
    position_ids' batch and sequence dimensions take the fed sizes, any other unknown dimension (a past
    length) 0. The table checks that follow reject a wrong guess."""
    sizes = {positions[0]: fed[0], positions[1]: fed[1]}
    return tuple(d if isinstance(d, int) else sizes.get(d, 0) for d in shape)


def feeds_kv_cache(value: ir.Value) -> bool:
    """A key: concatenated onto a past_key_values graph input."""
    for use in value.uses():
        node = use.node
        if node.op_type == "Concat" and any(i is not None and i.is_graph_input() for i in node.inputs):
            return True
    return False


def rules(max_positions: int, opset: int, keys: bool = True) -> list:
    return [Rotary.rule(f"rotary_{rotate}{'_partial' if partial else ''}", rotate=rotate, partial=partial,
                        max_positions=max_positions, opset=opset, keys=keys)
            for rotate in ("pairs", "strided", "half") for partial in (True, False)]
