"""Multi-head latent attention (glm4_moe_lite, GLM-4.7-Flash) in the absorbed form, caching the latent.

    h ─ q_a ─ RMSNorm ─ q_b ─ [B,H,S,nope+rope] ─ q_nope ─ ·W_uk ─ q_lat [B,H,S,r]      (or one q projection)
                                                └ q_rope ─ rotary
    h ─ kv_a ─ c [B,S,r] ─ RMSNorm ─ present.key   [B,1,T,r]     (past.key ++ c)
             └ k_rope ─ rotary ───── present.value [B,1,T,rope]  (past.value ++ k_rope)
    scores = (q_lat · cᵀ + q_rope · k_ropeᵀ) / sqrt(nope+rope) + mask ─ softmax ─ · c ─ ·W_uv ─ [B,H,S,v] ─ o

kv_b_proj [H·(nope+v), r] splits per head into W_uk (keys) and W_uv (values); multiplying the queries by W_uk
and the attended latent by W_uv computes what transformers computes by expanding every cached latent into
per-head keys and values (`expand_kv`), without that expansion: a step reads the cache once, r + rope
numbers per token and layer, where expanded K/V would be H·(nope+rope+v). transformers caches the same two
tensors (the normalized latent as the layer's keys, the rotated key as its values).

rope_interleave (the default) rotates (even, odd) pairs and transformers writes the results de-interleaved;
here they stay interleaved: queries and keys are permuted alike, so every score is the same.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .config import MLA_NORM_EPS, GlmConfig


def cache_dims(c: GlmConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(heads, head_dim) of a layer's cached key and value: the latent and the rotary key, one "head" each."""
    return (1, c.mla.kv_lora_rank), (1, c.mla.qk_rope_head_dim)


def mla_attention(g, c: GlmConfig, h: ir.Value, L, cos, sin, bias, past_k, past_v, rms_norm, apply_rope):
    """(attention output [B,S,hidden], present key, present value)."""
    a, heads = c.mla, c.num_heads
    nope, rope, r, v = a.qk_nope_head_dim, a.qk_rope_head_dim, a.kv_lora_rank, a.v_head_dim

    def linear(x, role):
        y = g.op("MatMul", x, L(role))
        return g.op("Add", y, L(f"{role}_bias")) if c.attention_bias and f"{role}_bias" in _BIASED else y

    if a.q_lora_rank is None:
        q = g.op("MatMul", h, L("q"))
    else:
        q = g.op("MatMul", rms_norm(g, linear(h, "q_a"), L("q_a_norm"), MLA_NORM_EPS), L("q_b"))
    q = g.op("Transpose", g.op("Reshape", q, g.const([0, 0, heads, nope + rope], np.int64)), perm=[0, 2, 1, 3])
    q_nope, q_rope = g.ops("Split", q, g.const([nope, rope], np.int64), num_outputs=2, axis=-1)
    latent, k_rope = g.ops("Split", linear(h, "kv_a"), g.const([r, rope], np.int64), num_outputs=2, axis=-1)
    latent = g.op("Unsqueeze", rms_norm(g, latent, L("kv_a_norm"), MLA_NORM_EPS), g.const([1], np.int64))
    k_rope = apply_rope(g, c, g.op("Unsqueeze", k_rope, g.const([1], np.int64)), cos, sin, rope)  # [B,1,S,rope]
    q_rope = apply_rope(g, c, q_rope, cos, sin, rope)
    present_k = g.op("Concat", past_k, latent, axis=2)  # [B,1,T,r]
    present_v = g.op("Concat", past_v, k_rope, axis=2)  # [B,1,T,rope]

    # kv_b as the graph stores it, [r, H*(nope+v)] -> per head [H, r, nope+v] -> W_uk [H, nope, r], W_uv [H, r, v]
    kv_b = g.op("Transpose", g.op("Reshape", L("kv_b"), g.const([r, heads, nope + v], np.int64)), perm=[1, 0, 2])
    w_uk, w_uv = (g.op("Slice", kv_b, g.const([start], np.int64), g.const([end], np.int64), g.const([-1], np.int64))
                  for start, end in ((0, nope), (nope, nope + v)))  # Slices, not a Split: constant-foldable
    q_latent = g.op("MatMul", q_nope, g.op("Transpose", w_uk, perm=[0, 2, 1]))  # [B,H,S,r]
    scores = g.op("Add", g.op("MatMul", q_latent, g.op("Transpose", present_k, perm=[0, 1, 3, 2])),
                  g.op("MatMul", q_rope, g.op("Transpose", present_v, perm=[0, 1, 3, 2])))  # [B,H,S,T]
    scores = g.op("Mul", scores, g.compute_const((nope + rope) ** -0.5))
    probs = g.op("Softmax", g.op("Add", g.cast(scores, ir.DataType.FLOAT), bias), axis=-1)
    out = g.op("MatMul", g.op("MatMul", g.cast(probs, g.dtype), present_k), w_uv)  # [B,H,S,v]
    out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, heads * v], np.int64))
    return linear(out, "o"), present_k, present_v


_BIASED = {"q_a_bias", "kv_a_bias", "o_bias"}
