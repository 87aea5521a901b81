"""Weight-name tables: which checkpoint tensor plays which role, with its expected shape.

Roles are family-independent (`layers.{i}.q`, `lm_head`, ...); names are the checkpoint's own,
so ONNX initializers, quantization scales and refit all speak the checkpoint's language.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import GlmConfig

# role -> name template, `{i}` is the layer index
_NAMES = {
    "glm": {
        "embed": "model.embed_tokens.weight",
        "final_norm": "model.norm.weight",
        "lm_head": "lm_head.weight",
        "layers.{i}.attn_norm": "model.layers.{i}.input_layernorm.weight",
        "layers.{i}.q": "model.layers.{i}.self_attn.q_proj.weight",
        "layers.{i}.q_bias": "model.layers.{i}.self_attn.q_proj.bias",
        "layers.{i}.k": "model.layers.{i}.self_attn.k_proj.weight",
        "layers.{i}.k_bias": "model.layers.{i}.self_attn.k_proj.bias",
        "layers.{i}.v": "model.layers.{i}.self_attn.v_proj.weight",
        "layers.{i}.v_bias": "model.layers.{i}.self_attn.v_proj.bias",
        "layers.{i}.o": "model.layers.{i}.self_attn.o_proj.weight",
        "layers.{i}.post_attn_norm": "model.layers.{i}.post_self_attn_layernorm.weight",
        "layers.{i}.mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
        "layers.{i}.gate_up": "model.layers.{i}.mlp.gate_up_proj.weight",
        "layers.{i}.down": "model.layers.{i}.mlp.down_proj.weight",
        "layers.{i}.post_mlp_norm": "model.layers.{i}.post_mlp_layernorm.weight",
    },
    "chatglm": {
        "embed": "transformer.embedding.word_embeddings.weight",
        "final_norm": "transformer.encoder.final_layernorm.weight",
        "lm_head": "transformer.output_layer.weight",
        "layers.{i}.attn_norm": "transformer.encoder.layers.{i}.input_layernorm.weight",
        "layers.{i}.qkv": "transformer.encoder.layers.{i}.self_attention.query_key_value.weight",
        "layers.{i}.qkv_bias": "transformer.encoder.layers.{i}.self_attention.query_key_value.bias",
        "layers.{i}.o": "transformer.encoder.layers.{i}.self_attention.dense.weight",
        "layers.{i}.mlp_norm": "transformer.encoder.layers.{i}.post_attention_layernorm.weight",
        "layers.{i}.gate_up": "transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight",
        "layers.{i}.down": "transformer.encoder.layers.{i}.mlp.dense_4h_to_h.weight",
    },
}
_NAMES["glm4"] = _NAMES["glm"]
_MOE_LAYER = "model.layers.{i}.mlp."
_NAMES["glm4_moe"] = {
    **{k: v for k, v in _NAMES["glm"].items() if "post_" not in k and k not in ("layers.{i}.gate_up", "layers.{i}.down")},
    "layers.{i}.q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    # a dense layer's (and the shared experts') gate and up projections are read as one matrix
    "layers.{i}.gate_up": "model.layers.{i}.mlp.gate_up_proj.weight",
    "layers.{i}.down": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.router": _MOE_LAYER + "gate.weight",
    "layers.{i}.router_bias": _MOE_LAYER + "gate.e_score_correction_bias",
    "layers.{i}.experts_gate_up": _MOE_LAYER + "experts.gate_up_proj",  # transformers' stacked [E, 2I, H]
    "layers.{i}.experts_down": _MOE_LAYER + "experts.down_proj",  # [E, H, I]
    "layers.{i}.shared_gate_up": _MOE_LAYER + "shared_experts.gate_up_proj.weight",
    "layers.{i}.shared_down": _MOE_LAYER + "shared_experts.down_proj.weight",
}
_ATTN = "model.layers.{i}.self_attn."
_NAMES["glm4_moe_lite"] = {
    **{k: v for k, v in _NAMES["glm4_moe"].items() if not k.split(".")[-1].startswith(("q", "k", "v"))},
    "layers.{i}.q": _ATTN + "q_proj.weight",  # without a query bottleneck (q_lora_rank null)
    "layers.{i}.q_a": _ATTN + "q_a_proj.weight", "layers.{i}.q_a_bias": _ATTN + "q_a_proj.bias",
    "layers.{i}.q_a_norm": _ATTN + "q_a_layernorm.weight", "layers.{i}.q_b": _ATTN + "q_b_proj.weight",
    "layers.{i}.kv_a": _ATTN + "kv_a_proj_with_mqa.weight", "layers.{i}.kv_a_bias": _ATTN + "kv_a_proj_with_mqa.bias",
    "layers.{i}.kv_a_norm": _ATTN + "kv_a_layernorm.weight", "layers.{i}.kv_b": _ATTN + "kv_b_proj.weight",
    "layers.{i}.o_bias": _ATTN + "o_proj.bias",
}
# the checkpoint tensors read into one: (graph role suffix) -> part name templates, concatenated along axis 0
_CONCAT = {"gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
           "shared_gate_up": ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight")}
# released checkpoints store each expert apart: stacked along a new axis 0 (gate and up concatenated first)
_PER_EXPERT = {"experts_gate_up": ("gate_proj.weight", "up_proj.weight"), "experts_down": ("down_proj.weight",)}

# Tensors a checkpoint may carry that the graph recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")


@dataclass(frozen=True)
class WeightSpec:
    role: str
    name: str  # the graph's name for it: the checkpoint's own, or transformers' name of what `parts` make
    shape: tuple[int, ...]
    linear: bool  # an [out, in] matrix (or a stack of them) that the graph stores transposed as [in, out]
    parts: tuple[tuple[str, ...], ...] = ()  # checkpoint tensors read into it (each group concatenated on axis 0)
    stacked: bool = False  # the groups of `parts` stacked along a new axis 0 (one per expert)
    fp32: bool = False  # kept in fp32 whatever the export's dtype (the router)

    def stored(self) -> dict[str, tuple[int, ...]]:
        """The checkpoint tensors this weight is read from, and the shape each must have."""
        if not self.parts:
            return {self.name: self.shape}
        shape = self.shape[1:] if self.stacked else self.shape
        return {n: (shape[0] // len(group), *shape[1:]) for group in self.parts for n in group}


def weight_specs(c: GlmConfig) -> dict[str, WeightSpec]:
    """Every tensor the decoder needs, by role, with the shape the checkpoint must have."""
    h, d = c.hidden_size, c.head_dim
    q_out, kv_out = c.num_heads * d, c.num_kv_heads * d
    shapes: dict[str, tuple[tuple[int, ...], bool]] = {
        "embed": ((c.vocab_size, h), False),
        "final_norm": ((h,), False),
        "lm_head": ((c.vocab_size, h), True),
    }
    layer: dict[str, tuple[tuple[int, ...], bool]] = {
        "attn_norm": ((h,), False),
        "o": ((h, q_out), True),
        "mlp_norm": ((h,), False),
        "gate_up": ((2 * c.intermediate_size, h), True),
        "down": ((h, c.intermediate_size), True),
    }
    if c.mla is not None:
        layer.update(_mla_layer(c))
    elif c.fused_qkv:
        layer["qkv"] = ((q_out + 2 * kv_out, h), True)
        if c.attention_bias:
            layer["qkv_bias"] = ((q_out + 2 * kv_out,), False)
    else:
        layer.update(q=((q_out, h), True), k=((kv_out, h), True), v=((kv_out, h), True))
        if c.attention_bias:
            layer.update(q_bias=((q_out,), False), k_bias=((kv_out,), False), v_bias=((kv_out,), False))
    if c.sandwich_norms:
        layer.update(post_attn_norm=((h,), False), post_mlp_norm=((h,), False))
    if c.qk_norm:
        layer.update(q_norm=((d,), False), k_norm=((d,), False))
    routed = None if c.moe is None else {
        **{role: spec for role, spec in layer.items() if role not in ("gate_up", "down")}, **_moe_layer(c)}
    for i in range(c.num_layers):
        for role, spec in (routed if c.is_moe_layer(i) else layer).items():
            shapes[f"layers.{i}.{role}"] = spec
    names = _NAMES[c.family]
    out = {}
    for role, (shape, linear) in shapes.items():
        template = role.split(".", 2)
        key = f"layers.{{i}}.{template[2]}" if role.startswith("layers.") else role
        name = names[key].format(i=template[1]) if role.startswith("layers.") else names[key]
        out[role] = _spec(c, role, name, shape, linear)
    return out


def _mla_layer(c: GlmConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    a, h, heads = c.mla, c.hidden_size, c.num_heads
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    out = {"o": ((h, heads * a.v_head_dim), True),
           "kv_a": ((a.kv_lora_rank + a.qk_rope_head_dim, h), True), "kv_a_norm": ((a.kv_lora_rank,), False),
           "kv_b": ((heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank), True)}
    if a.q_lora_rank is None:
        out["q"] = ((heads * qk, h), True)
    else:
        out.update(q_a=((a.q_lora_rank, h), True), q_a_norm=((a.q_lora_rank,), False),
                   q_b=((heads * qk, a.q_lora_rank), True))
    if c.attention_bias:
        out.update(kv_a_bias=((a.kv_lora_rank + a.qk_rope_head_dim,), False), o_bias=((h,), False))
        if a.q_lora_rank is not None:
            out["q_a_bias"] = ((a.q_lora_rank,), False)
    return out


def _moe_layer(c: GlmConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    m, h = c.moe, c.hidden_size
    shared = m.n_shared_experts * m.intermediate_size
    out = {"router": ((m.num_experts, h), True), "router_bias": ((m.num_experts,), False),
           "experts_gate_up": ((m.num_experts, 2 * m.intermediate_size, h), True),
           "experts_down": ((m.num_experts, h, m.intermediate_size), True)}
    if shared:
        out.update(shared_gate_up=((2 * shared, h), True), shared_down=((h, shared), True))
    return out


def _spec(c: GlmConfig, role: str, name: str, shape: tuple[int, ...], linear: bool) -> WeightSpec:
    if c.moe is None or not role.startswith("layers."):
        return WeightSpec(role, name, shape, linear)
    _, i, part = role.split(".", 2)
    layer = f"model.layers.{i}."
    if part in _CONCAT:
        return WeightSpec(role, name, shape, linear, parts=(tuple(layer + p for p in _CONCAT[part]),))
    if part in _PER_EXPERT:
        parts = tuple(tuple(f"{layer}mlp.experts.{e}.{p}" for p in _PER_EXPERT[part]) for e in range(shape[0]))
        return WeightSpec(role, name, shape, linear, parts=parts, stacked=True)
    return WeightSpec(role, name, shape, linear, fp32=part in ("router", "router_bias"))


def stacked_as_stored(spec: WeightSpec) -> WeightSpec:
    """The same experts read from transformers' own stacked tensor (`experts.gate_up_proj`) instead of one
    tensor per expert."""
    return dataclasses.replace(spec, parts=(), stacked=False)
