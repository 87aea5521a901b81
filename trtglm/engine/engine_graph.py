"""model.onnx -> engine.onnx, the graph a one-profile TensorRT engine is built from: attention unfused again.

TensorRT's IAttention layer (what the parser makes of an `Attention` op) costs kernels in a
one-profile engine, whose single kernel list is the prefill's: its prefill kernel reads K/V
repeated to every query head, which K's and V's cache appends write in a kernel each, and writes
[B,H,S,D], which another kernel moves into o_proj's layout. Written out as MatMul-Softmax-MatMul, Myelin fuses the same attention into its own mha
kernel, writes o_proj's layout directly, and with K and V stacked appends and repeats both in one
kernel: two kernels per layer fewer than IAttention (bench/fusion.py counts them).

    decomposed (auto's choice for one profile):
    K [B,KV,T,D] ─ Unsqueeze(1) ─┐
                                  Concat(1) ─ Unsqueeze(3) ─ Tile(G) ─ Reshape [B,2,H,T,D] ─┬─ Gather 0 ─ K'
    V [B,KV,T,D] ─ Unsqueeze(1) ─┘                                                          └─ Gather 1 ─ V'
    Q [B,H,S,D] ─ Mul(scale) ─ MatMul(Transpose(K')) ─[Cast fp32]─ Add(Where(mask, 0, -max)) ─ Softmax ─[Cast]
        ─ MatMul(V') ─> [B,H,S,D]

    grouped (no repeat; one kernel more, the mha output moved into o_proj's layout):
    K, V stacked as above, no Tile: K', V' [B,KV,T,D]
    Q [B,H,S,D] ─ Mul(scale) ─ Reshape [B,KV,G*S,D] ─ MatMul(Transpose(K')) ─[Cast]─ Add(Tile(Where(..), G rows))
        ─ Softmax ─[Cast]─ MatMul(V') ─ Reshape ─> [B,H,S,D]

A split-profile engine keeps the layer: its decode profile's kernel reads the KV heads as they are
(no repeated copy), where decomposed would write one. The ONNX Runtime graph (model.onnx) keeps the
`Attention` op too (it reads the KV heads directly); engine.onnx shares model.onnx.data, and
tests run both graphs in ONNX Runtime to show they compute the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as passes
from onnxscript.rewriter import pattern

from ..core.graphs import release_weights
from ..fusion import why_refused

_HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


class DecomposeAttention(pattern.RewriteRuleClassBase):
    """grouped=False: K/V repeated to the query heads. grouped=True: each KV head's G query heads become G x S
    query rows (Q [B,H,S,D] -> [B,KV,G*S,D]; the mask tiled G times along its rows), so nothing is repeated."""

    def __init__(self, name: str, masked: bool, grouped: bool = False):
        super().__init__(name)
        self.masked = masked
        self.grouped = grouped

    def pattern(self, op, q, k, v, mask):
        if self.masked:
            return op.Attention(q, k, v, mask, _allow_other_attributes=True)
        return op.Attention(q, k, v, _allow_other_attributes=True)

    def check(self, context, q, k, v, mask=None, **_):
        result = pattern.MatchResult()
        node = context.root
        extra = set(node.attributes) - {"scale"}
        if extra:
            return result.fail(f"Attention attributes {sorted(extra)} are not decomposed (only scale is)")
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return result.fail("Attention's present/qk outputs are used")
        for name, t in (("query", q), ("key", k), ("value", v)):
            if t.shape is None or t.shape.rank() != 4:
                return result.fail(f"{name} is not a 4-D [batch, heads, seq, head_dim] tensor", t)
        heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[3]
        if not all(isinstance(d, int) for d in (heads, kv_heads, head_dim)) or heads % kv_heads:
            return result.fail(f"head counts {heads}/{kv_heads} are not constants with KV dividing Q", q)
        if q.dtype not in (*_HALF, ir.DataType.FLOAT):
            return result.fail(f"query is {q.dtype}", q)
        if mask is not None and mask.dtype not in (ir.DataType.BOOL, q.dtype):
            return result.fail(f"mask is {mask.dtype}, neither bool nor the query's type", mask)
        if self.grouped and mask is not None and (mask.shape is None or mask.shape.rank() != 4 or mask.shape[1] != 1):
            return result.fail("grouped attention needs a [batch, 1, seq, total] mask shared by the heads", mask)
        scale = node.attributes.get("scale")
        self._scale = scale.value if scale is not None else 1 / float(np.sqrt(head_dim))
        self._shape = (heads, kv_heads, head_dim)
        return result

    def rewrite(self, op, q, k, v, mask=None, **_):
        heads, kv_heads, head_dim = self._shape
        dtype = q.dtype
        groups = heads // kv_heads if self.grouped else 1
        axis = _ints(op, [1])
        kv = op.Concat(op.Unsqueeze(k, axis), op.Unsqueeze(v, axis), axis=1)  # [B,2,KV,T,D]: one tensor to update
        if heads != kv_heads and not self.grouped:
            kv = op.Tile(op.Unsqueeze(kv, _ints(op, [3])), _ints(op, [1, 1, 1, heads // kv_heads, 1, 1]))
            kv = op.Reshape(kv, _ints(op, [0, 2, heads, -1, head_dim]))
        key = op.Gather(kv, _ints(op, 0), axis=1)
        value = op.Gather(kv, _ints(op, 1), axis=1)
        scale = op.Constant(value=ir.tensor(np.array(self._scale, dtype.numpy())))
        q = op.Mul(q, scale)  # before the first MatMul, as TensorRT asks
        if groups > 1:  # rows (g, s) of kv head k: query head k*G + g at position s
            q = op.Reshape(q, _ints(op, [0, kv_heads, -1, head_dim]))
        scores = op.MatMul(q, op.Transpose(key, perm=[0, 1, 3, 2]))
        if dtype in _HALF:
            scores = op.Cast(scores, to=ir.DataType.FLOAT)
        if mask is not None:
            if mask.dtype == ir.DataType.BOOL:
                low = np.finfo(np.float32).min
                bias = op.Where(mask, op.Constant(value=ir.tensor(np.array(0, np.float32))),
                                op.Constant(value=ir.tensor(np.array(low, np.float32))))
            else:
                bias = op.Cast(mask, to=ir.DataType.FLOAT) if dtype in _HALF else mask
            if groups > 1:  # [B,1,S,T] -> [B,1,G*S,T]: the same rows for every group
                bias = op.Tile(bias, _ints(op, [1, 1, groups, 1]))
            scores = op.Add(scores, bias)
        probs = op.Softmax(scores, axis=-1)
        if dtype in _HALF:
            probs = op.Cast(probs, to=dtype)
        out = op.MatMul(probs, value)
        if groups > 1:
            out = op.Reshape(out, _ints(op, [0, heads, -1, head_dim]))
        return out


def _ints(op, values):
    """An int64 Constant (shapes, axes, repeats, indices)."""
    return op.Constant(value=ir.tensor(np.array(values, np.int64)))


def rules(grouped: bool = False) -> list:
    name = "attention_grouped" if grouped else "attention_decomposed"
    return [DecomposeAttention.rule(name + "_masked", masked=True, grouped=grouped),
            DecomposeAttention.rule(name, masked=False, grouped=grouped)]


RULES = {"decomposed": rules(grouped=False), "grouped": rules(grouped=True)}


def attention_form(form: str, profiles: int) -> str:
    """`auto`: decomposed for one profile (its prefill kernel list repeats K/V anyway), the layer for split."""
    return ("decomposed" if profiles == 1 else "layer") if form == "auto" else form


def write_engine_graph(onnx_path: Path, out_path: Path, form: str = "decomposed") -> dict:
    """Write `out_path` beside `onnx_path`: the same graph with every Attention written out in `form` (decomposed
    or grouped), the weights still read from onnx_path's data file; nothing when no Attention could be. Returns
    how many were written out and how many stayed ops (with why)."""

    model = ir.load(onnx_path)  # the weights stay memory-mapped, never read: only the graph changes
    passes.ShapeInferencePass()(model)  # the precision stage's rewrites leave shapes undeclared (initializers aside)
    before = sum(node.op_type == "Attention" for node in model.graph)
    decomposed = pattern.RewriteRuleSet(RULES[form]).apply_to_model(model)
    kept = sum(node.op_type == "Attention" for node in model.graph)
    report = {"file": out_path.name, "attention": form, "decomposed": decomposed, "attention_ops": before,
              "kept": kept}
    if kept:
        report["why_kept"] = why_refused(model, RULES[form])
    if decomposed:  # else there is nothing to write: the engine is built from onnx_path
        ir.save(model, out_path)  # external tensors stay references into onnx_path's data file
    release_weights(model)
    return report
