"""GLM families: detect from config.json fields, normalize to one frozen config.

Three checkpoint layouts describe the same dense decoder, a fourth a mixture of experts:

    glm       GlmForCausalLM     (glm-4-9b-chat-hf)           model.layers.{i}.self_attn.q_proj ...
    glm4      Glm4ForCausalLM    (GLM-4-9B-0414, GLM-Z1)      + post_self_attn / post_mlp norms
    chatglm   remote-code        (ChatGLM2/3, glm-4-9b-chat)  transformer.encoder.layers.{i}.self_attention.query_key_value ...
    glm4_moe  Glm4MoeForCausalLM (GLM-4.5/4.6/4.7, -Air)      routed + shared experts, q/k norms, rotate-half rotary
    glm4_moe_lite  Glm4MoeLiteForCausalLM (GLM-4.7-Flash)     the same experts, multi-head latent attention (MLA)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

from ..core.errors import CheckpointError, UnsupportedCheckpoint

FAMILIES = ["glm (GlmForCausalLM)", "glm4 (Glm4ForCausalLM)", "chatglm (ChatGLM2/ChatGLM3/glm-4-9b-chat)",
            "glm4_moe (Glm4MoeForCausalLM: GLM-4.5/4.6/4.7, GLM-4.5-Air)",
            "glm4_moe_lite (Glm4MoeLiteForCausalLM: GLM-4.7-Flash)"]

MLA_NORM_EPS = 1e-6  # transformers builds the q_a and kv_a norms with their default eps, not rms_norm_eps


@dataclass(frozen=True)
class MlaConfig:
    """Multi-head latent attention: queries through a rank-`q_lora_rank` bottleneck (or one projection when None),
    keys and values from a `kv_lora_rank` latent shared by every head plus one `qk_rope_head_dim` rotary key.
    The KV cache holds the normalized latent (as the `key` of a layer) and the rotated key (as its `value`)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class MoeConfig:
    """The routed experts of a mixture-of-experts layer, as transformers' Glm4MoeTopkRouter computes them:
    sigmoid scores; experts chosen on scores + correction bias within the `topk_group` best of `n_group`
    groups (a group's score: its two best); weights from the unbiased scores, normalized if `norm_topk_prob`,
    times `routed_scaling_factor`. Shared experts are one MLP of `n_shared_experts` x `intermediate_size`."""

    num_experts: int
    top_k: int
    intermediate_size: int
    n_shared_experts: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense: int  # the first layers are dense MLPs


@dataclass(frozen=True)
class GlmConfig:
    family: str  # "glm" | "glm4" | "chatglm"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int  # GLM rotates only the first rotary_dim channels of each head, interleaved pairs
    rope_theta: float
    rms_norm_eps: float
    attention_bias: bool
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rotary_layout: str = "pairs"  # "pairs": interleaved (x0,x1) pairs; "half": rotate-half (glm4_moe)
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before the rotary
    moe: MoeConfig | None = None
    mla: MlaConfig | None = None
    mtp_layers: int = 0  # multi-token-prediction layers after the decoder: their tensors are not read

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and i >= self.moe.first_k_dense

    @property
    def sandwich_norms(self) -> bool:
        """glm4 adds post-attention and post-MLP norms inside each layer."""
        return self.family == "glm4"

    @property
    def fused_qkv(self) -> bool:
        """chatglm stores q, k and v as one query_key_value matrix."""
        return self.family == "chatglm"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def detect_family(cfg: dict[str, Any]) -> str:
    """The family from config fields only: model_type, architectures and layout-specific keys."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config.json: expected a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"config.json: architectures must be a list of names, got {archs!r}")
    if model_type == "glm4_moe_lite" or "Glm4MoeLiteForCausalLM" in archs:
        return "glm4_moe_lite"
    if model_type == "glm4_moe" or "Glm4MoeForCausalLM" in archs:
        return "glm4_moe"
    if model_type == "glm4" or "Glm4ForCausalLM" in archs:
        return "glm4"
    if model_type == "glm" or "GlmForCausalLM" in archs:
        return "glm"
    if model_type == "chatglm" or "ChatGLMModel" in archs or "ChatGLMForConditionalGeneration" in archs:
        if "multi_query_group_num" not in cfg or "kv_channels" not in cfg:
            raise UnsupportedCheckpoint(
                "chatglm config without multi_query_group_num/kv_channels (ChatGLM-6B v1 is not supported)", FAMILIES
            )
        return "chatglm"
    what = f"model_type={model_type!r}" + (f", architectures={archs}" if archs else "")
    raise UnsupportedCheckpoint(what, FAMILIES)


def _get(cfg: dict[str, Any], key: str, default: Any = dataclasses.MISSING) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is dataclasses.MISSING:
        raise CheckpointError(f"config.json: missing field {key!r}")
    return default


def _int(cfg: dict[str, Any], key: str, default: Any = dataclasses.MISSING, minimum: int = 1) -> int:
    """A whole-number field, at least `minimum`."""
    value = _get(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or \
            value in (float("inf"), float("-inf")) or int(value) != value or value < minimum:
        raise CheckpointError(f"config.json: {key} must be a whole number of at least {minimum}, got {value!r}")
    return int(value)


def _float(cfg: dict[str, Any], key: str, default: Any = dataclasses.MISSING, positive: bool = True) -> float:
    value = _get(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            (positive and value <= 0):
        raise CheckpointError(f"config.json: {key} must be a {'positive ' if positive else ''}number, got {value!r}")
    return float(value)


def _rope(cfg: dict[str, Any]) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from the flat or the `rope_parameters` form."""
    key = "rope_parameters" if cfg.get("rope_parameters") is not None else "rope_scaling"
    params = cfg.get(key) or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"config.json: {key} must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedCheckpoint(f"rope_type={rope_type!r} (only the default GLM rotary embedding)", FAMILIES)
    merged = {**cfg, **params}  # the nested form wins
    return _float(merged, "rope_theta", 10000.0), _float(merged, "partial_rotary_factor", 0.5)


# GlmConfig's sizes -> their config.json keys: (chatglm's, glm and glm4's)
_SIZES = {"vocab_size": ("padded_vocab_size", "vocab_size"), "hidden_size": ("hidden_size", "hidden_size"),
          "intermediate_size": ("ffn_hidden_size", "intermediate_size"),
          "num_layers": ("num_layers", "num_hidden_layers"), "num_heads": ("num_attention_heads", "num_attention_heads")}


def normalize(cfg: dict[str, Any]) -> GlmConfig:
    family = detect_family(cfg)
    sizes = {field: _int(cfg, keys[family != "chatglm"]) for field, keys in _SIZES.items()}
    heads = sizes["num_heads"]
    if family == "chatglm":
        if not cfg.get("rmsnorm", True) or cfg.get("apply_residual_connection_post_layernorm", False):
            raise UnsupportedCheckpoint("chatglm with LayerNorm or post-layernorm residuals", FAMILIES)
        if cfg.get("add_bias_linear", False):
            raise UnsupportedCheckpoint("chatglm with add_bias_linear=true", FAMILIES)
        head_dim = _int(cfg, "kv_channels")
        kv_heads = _int(cfg, "multi_query_group_num") if cfg.get("multi_query_attention", True) else heads
        rotary_dim, theta = head_dim // 2, 10000.0 * _float(cfg, "rope_ratio", 1.0)
        eps, bias, positions = _float(cfg, "layernorm_epsilon", 1e-5), cfg.get("add_qkv_bias", True), "seq_length"
    else:
        if _get(cfg, "hidden_act", "silu") != "silu":
            raise UnsupportedCheckpoint(f"hidden_act={cfg['hidden_act']!r}", FAMILIES)
        theta, factor = _rope(cfg)
        head_dim = _int(cfg, "head_dim", sizes["hidden_size"] // heads)
        kv_heads, rotary_dim = _int(cfg, "num_key_value_heads", heads), int(head_dim * factor)
        eps, positions = _float(cfg, "rms_norm_eps", 1e-5), "max_position_embeddings"
        bias = cfg.get("attention_bias", family not in ("glm4_moe", "glm4_moe_lite"))  # transformers' defaults
    out = GlmConfig(family=family, **sizes, num_kv_heads=kv_heads, head_dim=head_dim, rotary_dim=rotary_dim,
                    rope_theta=theta, rms_norm_eps=eps, attention_bias=bool(bias),
                    max_position_embeddings=_int(cfg, positions, 8192),
                    tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    if family == "glm4_moe":
        out = dataclasses.replace(out, rotary_layout="half", qk_norm=bool(cfg.get("use_qk_norm", False)),
                                  moe=_moe(cfg),
                                  mtp_layers=_int(cfg, "num_nextn_predict_layers", 0, minimum=0))
    if family == "glm4_moe_lite":
        out = _lite(cfg, out)
    _check(out)
    return out


def _lite(cfg: dict[str, Any], out: GlmConfig) -> GlmConfig:
    """glm4_moe_lite: MLA attention, one latent "KV head", the rotary part of each query and key rotated whole."""
    bottleneck = "q_lora_rank" not in cfg or cfg["q_lora_rank"] is not None  # null: one query projection
    mla = MlaConfig(q_lora_rank=_int(cfg, "q_lora_rank", 768) if bottleneck else None,
                    kv_lora_rank=_int(cfg, "kv_lora_rank", 512), qk_nope_head_dim=_int(cfg, "qk_nope_head_dim", 192),
                    qk_rope_head_dim=_int(cfg, "qk_rope_head_dim", 64), v_head_dim=_int(cfg, "v_head_dim", 256))
    if _rope(cfg)[1] != 1.0 and "partial_rotary_factor" in {**cfg, **(cfg.get("rope_parameters") or {})}:
        raise UnsupportedCheckpoint("glm4_moe_lite with partial_rotary_factor != 1", FAMILIES)
    types = cfg.get("mlp_layer_types") or ["dense"] + ["sparse"] * (out.num_layers - 1)
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise CheckpointError(f"config.json: mlp_layer_types must be a list of \"dense\" and \"sparse\", got {types!r}")
    dense = sum(1 for _ in itertools.takewhile(lambda t: t == "dense", types))
    if len(types) != out.num_layers or set(types) - {"dense", "sparse"} or "dense" in types[dense:]:
        raise UnsupportedCheckpoint(f"mlp_layer_types {types} (dense layers first, then sparse, one per layer)",
                                    FAMILIES)
    moe = _moe({"n_routed_experts": 64, "num_experts_per_tok": 4, "moe_intermediate_size": 1536,
                "routed_scaling_factor": 1.8, **cfg, "first_k_dense_replace": dense})
    return dataclasses.replace(out, head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim, num_kv_heads=1,
                               rotary_dim=mla.qk_rope_head_dim,
                               rotary_layout="pairs" if cfg.get("rope_interleave", True) else "half",
                               moe=moe, mla=mla, mtp_layers=_int(cfg, "num_nextn_predict_layers", 0, minimum=0))


def _moe(cfg: dict[str, Any]) -> MoeConfig:
    experts = _int(cfg, "n_routed_experts")
    moe = MoeConfig(num_experts=experts, top_k=_int(cfg, "num_experts_per_tok"),
                    intermediate_size=_int(cfg, "moe_intermediate_size"),
                    n_shared_experts=_int(cfg, "n_shared_experts", 1, minimum=0),
                    n_group=_int(cfg, "n_group", 1), topk_group=_int(cfg, "topk_group", 1),
                    norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                    routed_scaling_factor=_float(cfg, "routed_scaling_factor", 1.0),
                    first_k_dense=_int(cfg, "first_k_dense_replace", 1, minimum=0))
    if moe.top_k > experts:
        raise CheckpointError(f"config.json: num_experts_per_tok {moe.top_k} exceeds n_routed_experts {experts}")
    if experts % moe.n_group:
        raise CheckpointError(f"config.json: {experts} experts do not divide into n_group {moe.n_group} groups")
    if moe.n_group > 1 and (experts // moe.n_group < 2 or moe.topk_group > moe.n_group
                            or moe.top_k > moe.topk_group * (experts // moe.n_group)):
        raise CheckpointError(f"config.json: group-limited routing needs at least 2 experts per group, topk_group "
                              f"<= n_group and num_experts_per_tok <= the experts of topk_group groups (got "
                              f"{experts} experts, n_group {moe.n_group}, topk_group {moe.topk_group}, "
                              f"top-{moe.top_k})")
    return moe


def _check(c: GlmConfig) -> None:
    if c.num_kv_heads <= 0 or c.num_heads % c.num_kv_heads:
        raise CheckpointError(f"config.json: {c.num_heads} attention heads do not divide into {c.num_kv_heads} KV heads")
    if c.rotary_dim % 2 or not 0 < c.rotary_dim <= c.head_dim:
        raise CheckpointError(f"config.json: rotary dimension {c.rotary_dim} does not fit head_dim {c.head_dim}")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
        if getattr(c, field) <= 0:
            raise CheckpointError(f"config.json: {field} must be positive, got {getattr(c, field)}")
