"""Weight-name tables: which checkpoint tensor plays which role, with its expected shape.

Roles are family-independent (`layers.{i}.q`, `lm_head`, ...); names are the checkpoint's own,
so ONNX initializers, quantization scales and refit all speak the checkpoint's language.
"""

from __future__ import annotations

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

# Tensors a checkpoint may carry that the graph recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")


@dataclass(frozen=True)
class WeightSpec:
    role: str
    name: str
    shape: tuple[int, ...]
    linear: bool  # an [out, in] matrix that the graph stores transposed as [in, out]


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
    if c.fused_qkv:
        layer["qkv"] = ((q_out + 2 * kv_out, h), True)
        if c.attention_bias:
            layer["qkv_bias"] = ((q_out + 2 * kv_out,), False)
    else:
        layer.update(q=((q_out, h), True), k=((kv_out, h), True), v=((kv_out, h), True))
        if c.attention_bias:
            layer.update(q_bias=((q_out,), False), k_bias=((kv_out,), False), v_bias=((kv_out,), False))
    if c.sandwich_norms:
        layer.update(post_attn_norm=((h,), False), post_mlp_norm=((h,), False))
    for i in range(c.num_layers):
        for role, spec in layer.items():
            shapes[f"layers.{i}.{role}"] = spec
    names = _NAMES[c.family]
    out = {}
    for role, (shape, linear) in shapes.items():
        template = role.split(".", 2)
        key = f"layers.{{i}}.{template[2]}" if role.startswith("layers.") else role
        name = names[key].format(i=template[1]) if role.startswith("layers.") else names[key]
        out[role] = WeightSpec(role, name, shape, linear)
    return out
