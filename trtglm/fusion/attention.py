"""Attention core (GQA repeat, scale, mask, softmax, matmuls) -> Attention (opset 23).

    K [B,KV,T,D] ─ Unsqueeze(2) ─ Expand[B,KV,rep,T,D] ─ Reshape[B,KV*rep,T,D] ─ Transpose(0,1,3,2) ─┐
    Q [B,H,S,D] ───────────────────────────────────────────────────────────────────────────── MatMul ─ Mul(scale)
        ─[Cast fp32]─ Add(mask) ─ Softmax(-1) ─[Cast]─ MatMul ─> [B,H,S,D]
    V [B,KV,T,D] ─ Unsqueeze ─ Expand ─ Reshape ──────────────────────┘      (no repeat when KV = H)

    ==>  Attention(Q, K, V, mask, scale) ─> [B,H,S,D]

K and V stay un-repeated (the op does grouped-query attention from the head counts), and the KV
cache Concat stays outside the op: TensorRT's parser rejects Attention nodes with past/present.
An additive mask built as Where(allowed, 0, -big) becomes the boolean `allowed`, so the mask keeps
its lower-right causal alignment in decode and chunked prefill (no is_causal, which TensorRT
aligns to the upper left).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


class AttentionCore(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, repeat: bool):
        super().__init__(name)
        self.repeat = repeat

    def pattern(self, op, q, k, v, scale, bias, k_expand, k_merge, v_expand, v_merge, compute_type, out_type):
        if self.repeat:
            k_all = op.Reshape(op.Expand(op.Unsqueeze(k, [2]), k_expand), k_merge)
            v_all = op.Reshape(op.Expand(op.Unsqueeze(v, [2]), v_expand), v_merge)
        else:
            k_all, v_all = k, v
        scores = op.Mul(op.MatMul(q, op.Transpose(k_all, perm=[0, 1, 3, 2])), scale)
        scores = pattern.OrValue([op.Cast(scores, to=compute_type), scores])
        probs = op.Softmax(op.Add(scores, bias), axis=-1)
        probs = pattern.OrValue([op.Cast(probs, to=out_type), probs])
        return op.MatMul(probs, v_all)

    def check(self, context, q, k, v, scale, bias, **vars_):
        result = pattern.MatchResult()
        for name, t in (("query", q), ("key", k), ("value", v)):
            if t.shape is None or t.shape.rank() != 4:
                return result.fail(f"{name} is not a 4-D [batch, heads, seq, head_dim] tensor", t)
        if scale.const_value is None or scale.const_value.size != 1:
            return result.fail("scale is not a constant scalar", scale)
        heads, kv_heads = q.shape[1], k.shape[1]
        if self.repeat:
            for which in ("k_expand", "v_expand"):
                rep = _repeat_factor(vars_[which])
                if rep is None:
                    return result.fail("cannot prove the Expand repeats KV heads along axis 2", vars_[which])
                if isinstance(heads, int) and isinstance(kv_heads, int) and heads != kv_heads * rep:
                    return result.fail(f"{heads} query heads != {kv_heads} KV heads x {rep}")
        elif isinstance(heads, int) and isinstance(kv_heads, int) and heads != kv_heads:
            return result.fail(f"{heads} query heads but {kv_heads} KV heads and no repeat")
        mask = _boolean_mask(bias)
        if mask is None and bias.dtype != q.dtype:
            return result.fail(f"additive mask is {bias.dtype}, query is {q.dtype}, and not a Where(mask, 0, -big)", bias)
        self._mask = mask if mask is not None else bias
        return result

    def rewrite(self, op, q, k, v, scale, **_):
        # No softmax_precision, even where the chain softmaxed in fp32: TensorRT's parser rejects the
        # attribute ("Setting softmax precision is not supported in TensorRT Attention").
        return op.Attention(q, k, v, self._mask, scale=float(np.asarray(scale.const_value.numpy()).item()))


def _boolean_mask(bias: ir.Value) -> ir.Value | None:
    """`allowed` if bias = Where(allowed, 0, x) with x at most -1e4, else None."""
    node = bias.producer()
    if node is None or node.op_type != "Where" or node.inputs[0].dtype != ir.DataType.BOOL:
        return None
    zero, neg = (node.inputs[i].const_value for i in (1, 2))
    if zero is None or neg is None or zero.size != 1 or neg.size != 1:
        return None
    if float(np.asarray(zero.numpy()).item()) != 0.0 or float(np.asarray(neg.numpy()).item()) > -1e4:
        return None
    return node.inputs[0]


def _repeat_factor(shape: ir.Value) -> int | None:
    """n_rep if `shape` is [B, KV, n_rep, T, D] with constant KV and n_rep (a constant, or a Concat with them)."""
    if shape.const_value is not None:
        dims = np.asarray(shape.const_value.numpy()).reshape(-1)
        return int(dims[2]) if dims.size == 5 else None
    node = shape.producer()
    if node is None or node.op_type != "Concat":
        return None
    pieces = []
    for piece in node.inputs:
        if piece.const_value is not None:
            pieces += [int(d) for d in np.asarray(piece.const_value.numpy()).reshape(-1)]
        elif piece.shape is not None and piece.shape.rank() == 1 and isinstance(piece.shape[0], int):
            pieces += [None] * piece.shape[0]
        else:
            return None
    return pieces[2] if len(pieces) == 5 and pieces[1] is not None and pieces[2] is not None else None


RULES = [AttentionCore.rule("attention_gqa", repeat=True), AttentionCore.rule("attention", repeat=False)]
