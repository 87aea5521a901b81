"""Graph fusion: the exported decoder -> the graph TensorRT runs best, every rewrite proven by tests.

Order matters: norms first, then rotary (its output is attention's query and key), then attention.
`fuse()` reports a count per rule and, in strict mode, insists that the graph ends with the fused
ops a model of L layers must have, naming the rule and the reason whenever one falls short.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx_ir as ir
import onnx_ir.passes.common as passes
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchingTracer

from ..core.errors import TrtglmError
from ..core.recipe import (
    DEFAULT_FUSIONS as _DEFAULTS,  # the names live with the recipe schema
)
from ..core.recipe import FUSIONS  # noqa: F401
from . import attention, key_fold, qkv, rms_norm, rotary

FUSION_OPSET = 23
FUSED_OP = {"rms_norm": "RMSNormalization", "rotary": "RotaryEmbedding", "attention": "Attention"}
DEFAULT_FUSIONS = frozenset(_DEFAULTS)
KEY_ROTATIONS = frozenset({"rotary_keys", "rotary_keys_folded"})


class FusionError(TrtglmError):
    """Strict mode: a rule matched fewer times than the model needs."""


@dataclass
class FusionReport:
    rewrites: dict[str, int]  # per rule, in this run
    fused: dict[str, int]  # per kind, fused ops now in the graph
    expected: dict[str, int | tuple[int, ...]] | None
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def expected_counts(num_layers: int, sandwich_norms: bool | None, fusions: frozenset[str] = DEFAULT_FUSIONS,
                    separate_qkv: bool | None = None, final_norm: bool = True,
                    qk_norms: bool = False) -> dict[str, int | tuple[int, ...]]:
    """What a GLM decoder of L layers fuses into: norms 2L+1 (4L+1 with glm4's extra norms, 2L more with
    glm4_moe's per-head query and key norms), L merged q/k/v projections (none where the checkpoint stores them
    merged, as chatglm does; either when unknown), a rotary per query (and per key with rotary_keys), L key
    rotations folded into projections, L attention. A stage of a staged build that ends before the last layer
    has no final norm (`final_norm` False)."""
    norms = tuple(n + 2 * num_layers * qk_norms for n in (2 * num_layers + final_norm, 4 * num_layers + final_norm))
    return {"rms_norm": norms if sandwich_norms is None else norms[int(sandwich_norms)],
            "qkv": num_layers if separate_qkv else 0 if separate_qkv is False else (0, num_layers),
            "rotary_keys_folded": num_layers,  # before rotary: a key left unfolded is one RotaryEmbedding too many
            "rotary": num_layers * (2 if "rotary_keys" in fusions else 1), "attention": num_layers}


def total(reports: list[FusionReport]) -> FusionReport:
    """The reports of a staged build's stages as one: counts added (nodes computed again in every stage that
    needs them, the attention mask, counted in each)."""

    def plus(a, b):  # an expected count may be a tuple of the counts allowed
        if not isinstance(a, tuple) and not isinstance(b, tuple):
            return a + b
        a, b = (x if isinstance(x, tuple) else (x,) * len(y if isinstance(y, tuple) else (y,)) for x, y in
                ((a, b), (b, a)))
        return tuple(x + y for x, y in zip(a, b))

    def add(dicts):
        if any(d is None for d in dicts):
            return None
        out: dict = {}
        for d in dicts:
            for k, v in d.items():
                out[k] = plus(out.get(k, 0), v)
        return out

    return FusionReport(add([r.rewrites for r in reports]), add([r.fused for r in reports]),
                        add([r.expected for r in reports]), sum(r.nodes_before for r in reports),
                        sum(r.nodes_after for r in reports), add([r.ops_before for r in reports]),
                        add([r.ops_after for r in reports]))


def model_fusions(fusions: frozenset[str], config: dict) -> frozenset[str]:
    """The fusions that apply to a model (its export's config): keys normalized per head between their
    projection and their rotation (qk-norm) cannot have the rotation folded into the projection; without the
    fold their rotation stays decomposed (a key RotaryEmbedding feeding the cache Concat is what TensorRT-RTX
    cannot build into a fused Attention, rotary.py), unless rotary_keys asks for it (a static cache has no Concat).
    Multi-head latent attention has no Attention op to fuse into: its rotary key becomes a RotaryEmbedding."""
    if config.get("mla"):
        return fusions - {"rotary_keys_folded"} | ({"rotary_keys"} if "rotary" in fusions else set())
    return fusions - {"rotary_keys_folded"} if config.get("qk_norm") else fusions


def model_counts(config: dict, family: str, layers: int, fusions: frozenset[str],
                 final_norm: bool = True) -> dict[str, int | tuple[int, ...]]:
    """expected_counts for `layers` of an export's decoder (its export.json config and family). MLA: per layer
    the two norms, the latent's norm and the query bottleneck's (if any), no q/k/v triple to merge, the query's
    and the key's rotary, and no Attention op (the absorbed form: two score GEMMs, written out for Myelin)."""
    mla = config.get("mla")
    if mla:
        norms = layers * (3 + (mla.get("q_lora_rank") is not None)) + final_norm
        return {"rms_norm": norms, "qkv": 0, "rotary": layers * (2 if "rotary_keys" in fusions else 1),
                "attention": 0}
    return expected_counts(layers, family == "glm4", fusions, separate_qkv=family != "chatglm",
                           final_norm=final_norm, qk_norms=bool(config.get("qk_norm")))


def rule_sets(max_positions: int, fusions: frozenset[str] = DEFAULT_FUSIONS):
    kinds = {"rms_norm": rms_norm.RULES,
             "rotary": rotary.rules(max_positions, FUSION_OPSET, keys=bool(KEY_ROTATIONS & fusions)),
             "attention": attention.RULES}
    return {kind: rules for kind, rules in kinds.items() if kind in fusions}


def fuse(model: ir.Model, *, max_positions: int, expected: dict | None = None, strict: bool = True,
         fusions: frozenset[str] = DEFAULT_FUSIONS) -> FusionReport:
    """Rewrite `model` in place. Raises FusionError in strict mode when a fused-op count falls short."""
    ops_before = _ops(model)
    if model.opset_imports.get("", 0) < FUSION_OPSET:
        from onnxscript.version_converter import convert_version

        convert_version(model, FUSION_OPSET)
    model.ir_version = max(model.ir_version or 0, 11)
    _tidy(model)
    rewrites: dict[str, int] = {}
    unknown = set(fusions) - set(FUSIONS)
    if unknown:
        raise TrtglmError(f"unknown fusion(s) {sorted(unknown)}; known: {', '.join(FUSIONS)}")
    if KEY_ROTATIONS <= fusions:
        raise TrtglmError("fusions rotary_keys and rotary_keys_folded are alternatives: choose one")
    if KEY_ROTATIONS & fusions and "rotary" not in fusions:
        raise TrtglmError("fusions rotary_keys and rotary_keys_folded extend rotary: add it")
    kinds = rule_sets(max_positions, fusions)
    refused = {"qkv": [], "rotary_keys_folded": []}
    if "qkv" in fusions:
        rewrites["qkv_projection"], refused["qkv"] = qkv.merge_qkv(model.graph)
        _tidy(model)
    for kind, rules in kinds.items():
        for rule in rules:
            rewrites[rule.name] = pattern.RewriteRuleSet([rule]).apply_to_model(model)
        if kind == "rotary" and "rotary_keys_folded" in fusions:
            rewrites["rotary_keys_folded"], refused["rotary_keys_folded"] = key_fold.fold_key_rotations(model.graph)
        _tidy(model)
    ops_after = _ops(model)
    fused = {kind: ops_after.get(op, 0) for kind, op in FUSED_OP.items()}
    for kind in ("qkv", "rotary_keys_folded"):  # no op of their own: counted by rewrites
        if kind in fusions:
            fused[kind] = rewrites["qkv_projection" if kind == "qkv" else kind]
    report = FusionReport(rewrites, fused, expected, sum(ops_before.values()), sum(ops_after.values()),
                          ops_before, ops_after)
    if strict and expected:
        _enforce(model, report, kinds, refused)
    return report


def _tidy(model: ir.Model) -> None:
    """Types and shapes, small constant folding, dead nodes, shared constants, one copy of each subexpression."""
    from onnxscript.optimizer import fold_constants

    passes.ShapeInferencePass()(model)
    fold_constants(model, output_size_limit=1 << 20)
    passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    passes.DeduplicateInitializersPass(size_limit=1 << 24)(model)
    passes.CommonSubexpressionEliminationPass()(model)
    passes.RemoveUnusedNodesPass()(model)
    passes.TopologicalSortPass()(model)
    passes.ShapeInferencePass()(model)


def _ops(model: ir.Model) -> dict[str, int]:
    return dict(Counter(node.op_type for node in model.graph))


def _enforce(model: ir.Model, report: FusionReport, kinds: dict, refused: dict[str, list[str]]) -> None:
    active = set(kinds) | (set(refused) & set(report.fused))
    for kind, want in report.expected.items():
        if kind not in active:
            continue
        got = report.fused[kind]
        allowed = want if isinstance(want, tuple) else (want,)
        if got in allowed:
            continue
        wanted = " or ".join(str(w) for w in allowed)
        if kind in refused:
            why = ("refused: " + "; ".join(refused[kind])) if refused[kind] else {
                "qkv": "no value feeds three MatMul+Add projections",
                "rotary_keys_folded": "no key rotation became a RotaryEmbedding to fold"}[kind]
        else:
            why = why_refused(model, kinds[kind])
        what = f"{FUSED_OP[kind]} op(s)" if kind in FUSED_OP else {"qkv": "q/k/v merge(s)",
                                                                    "rotary_keys_folded": "folded key rotation(s)"}[kind]
        raise FusionError(f"strict fusion: {got} {what} in the graph, expected {wanted}; "
                          + why,
                          hint="pass --no-strict to build the graph as far as it fuses")


def why_refused(model: ir.Model, rules) -> str:
    """The rule whose best partial match got furthest, and why it stopped."""
    tracer = MatchingTracer()
    pattern.RewriteRuleSet(rules).apply_to_model(model, tracer=tracer)
    best = None
    for rule, matches in tracer.best_matches_map.items():
        for m in matches:
            if best is None or m.score() > best[1].score():
                best = (rule, m)
    if best is None:
        return "no rule found even a partial match"
    rule, m = best
    node = m.root_node
    return f"rule {rule.name} refused at node {node.name} ({node.op_type}): {m.match_result.reason}"
