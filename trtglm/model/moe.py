"""The mixture-of-experts MLP of glm4_moe as plain ONNX ops (TensorRT's MoE layer has no ONNX importer).

    h [B,S,H] ─ router (fp32) ─ TopK ─ idx [N,k], weights [N,k] ─ R [N,E]: each token's weight per expert (0 if
                                                                           not chosen)
              ids = TopK(tokens choosing each expert, min(E, N·k)) [U]: every chosen expert is among them
              Gather(gate_up [E,H,2I], ids) ─ MatMul(every token) ─ SiLU(gate)·up ─ MatMul(Gather(down, ids))
              ─ [U,N,H] · R[:, ids] where R > 0 ─ ReduceSum(U) ─ + shared experts MLP

A step reads U = min(E, N·k) experts' weights: a decode step of one row the k it chose, a long prefill every
expert once. Every token goes through each gathered expert and the ones it did not choose are weighted by an
exact zero (their outputs are dropped), so the sum is the routed one. No data-dependent shapes (NonZero is a plugin in TensorRT): U comes
from the shapes alone.

Router, as transformers' Glm4MoeTopkRouter: logits = h·Wᵀ in fp32, scores = sigmoid(logits); experts chosen
by scores + e_score_correction_bias, among the `topk_group` best groups of `n_group` (a group scores the sum
of its two best); weights gathered from the unbiased scores, normalized if norm_topk_prob, times
routed_scaling_factor. Its nodes are named `router/...` so that half precision keeps them in fp32.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .config import GlmConfig

ROUTER = "router/"  # node name prefixes
EXPERTS = "experts/"  # the choice of the experts a step reads, and the sum of their outputs


def moe_mlp(g, c: GlmConfig, h: ir.Value, L, mlp) -> ir.Value:
    """The routed experts plus the shared experts for `h` [B,S,H]; `L(role)` gives a layer weight, `mlp` is the
    dense MLP builder (for the shared experts)."""
    m, H = c.moe, c.hidden_size
    flat = g.op("Reshape", h, g.const([-1, H], np.int64))  # [N,H]
    with g.named(ROUTER):
        idx, weights = _route(g, c, flat, L("router"), L("router_bias"))
        onehot = g.op("OneHot", idx, g.const([m.num_experts], np.int64), g.const([0.0, 1.0], np.float32), axis=-1)
        per_expert = g.op("ReduceSum", g.op("Mul", onehot, g.op("Unsqueeze", weights, g.const([-1], np.int64))),
                          g.const([1], np.int64), keepdims=0)  # [N,E]
        chosen_by = g.op("ReduceSum", onehot, g.const([0, 1], np.int64), keepdims=0)  # [E]: tokens per expert
    # the experts some token chose are among the min(E, N*k) most chosen: TopK, not NonZero (a plugin in TensorRT)
    pairs = g.op("Mul", g.op("Shape", flat, start=0, end=1), g.const([m.top_k], np.int64))
    with g.named(EXPERTS):
        _, ids = g.ops("TopK", chosen_by, g.op("Min", pairs, g.const([m.num_experts], np.int64)),
                       num_outputs=2, axis=-1)  # [U]
    up = g.op("MatMul", flat, g.op("Gather", L("experts_gate_up"), ids, axis=0))  # [U,N,2I]
    gate, lin = g.ops("Split", up, g.const([m.intermediate_size] * 2, np.int64), num_outputs=2, axis=-1)
    act = g.op("Mul", lin, g.op("Mul", gate, g.op("Sigmoid", gate)))
    out = g.op("MatMul", act, g.op("Gather", L("experts_down"), ids, axis=0))  # [U,N,H]
    w = g.op("Unsqueeze", g.op("Transpose", g.op("Gather", per_expert, ids, axis=1), perm=[1, 0]),
             g.const([-1], np.int64))  # [U,N,1]
    # an expert's output for a token that did not choose it is dropped, not multiplied by 0: in half precision
    # it may overflow (inf * 0 = NaN)
    weighted = g.op("Where", g.op("Greater", w, g.const(0.0, np.float32)), g.op("Mul", out, g.cast(w, g.dtype)),
                    g.compute_const(0.0))
    with g.named(EXPERTS):  # the block's end, for ONNX Runtime's MoE op (runtime/moe_op.py)
        routed = g.op("ReduceSum", weighted, g.const([0], np.int64), keepdims=0)  # [N,H]
    routed = g.op("Reshape", routed, g.op("Shape", h))
    if not m.n_shared_experts:
        return routed
    return g.op("Add", routed, mlp(g, m.n_shared_experts * m.intermediate_size, h, L("shared_gate_up"),
                                   L("shared_down")))


def _route(g, c: GlmConfig, flat: ir.Value, router: ir.Value, bias: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(chosen experts [N,k] int64, their weights [N,k] fp32)."""
    m = c.moe
    logits = g.op("MatMul", g.cast(flat, ir.DataType.FLOAT), router)  # [N,E], fp32 weights
    scores = g.op("Sigmoid", logits)
    choice = g.op("Add", scores, bias)
    if m.n_group > 1:
        per_group = m.num_experts // m.n_group
        grouped = g.op("Reshape", choice, g.const([-1, m.n_group, per_group], np.int64))
        best_two, _ = g.ops("TopK", grouped, g.const([2], np.int64), num_outputs=2, axis=-1)
        group_scores = g.op("ReduceSum", best_two, g.const([-1], np.int64), keepdims=0)  # [N,G]
        _, groups = g.ops("TopK", group_scores, g.const([m.topk_group], np.int64), num_outputs=2, axis=-1)
        chosen = g.op("ReduceMax", g.op("OneHot", groups, g.const([m.n_group], np.int64),
                                         g.const([0.0, 1.0], np.float32), axis=-1),
                      g.const([1], np.int64), keepdims=0)  # [N,G]: 1 for the topk_group groups
        keep = g.op("Reshape", g.op("Expand", g.op("Unsqueeze", chosen, g.const([-1], np.int64)),
                                    g.const([1, m.n_group, per_group], np.int64)), g.op("Shape", choice))
        choice = g.op("Where", g.op("Cast", keep, to=ir.DataType.BOOL), choice,
                      g.const(-np.inf, np.float32))
    _, idx = g.ops("TopK", choice, g.const([m.top_k], np.int64), num_outputs=2, axis=-1)
    weights = g.op("GatherElements", scores, idx, axis=1)
    if m.norm_topk_prob:
        total = g.op("Add", g.op("ReduceSum", weights, g.const([-1], np.int64), keepdims=1),
                     g.const(1e-20, np.float32))
        weights = g.op("Div", weights, total)
    if m.routed_scaling_factor != 1.0:
        weights = g.op("Mul", weights, g.const(m.routed_scaling_factor, np.float32))
    return idx, weights
