"""The PyTorch reference: transformers' own GLM model over the checkpoint's weights.

chatglm checkpoints are mapped onto the `glm` layout (split query_key_value, rename), which is the
same network; no remote code is ever run.
"""

from __future__ import annotations

from ..core.dtypes import FLOATS
from .checkpoint import Checkpoint
from .config import GlmConfig


def hf_config(c: GlmConfig):
    """A transformers config for the same network (chatglm -> glm)."""
    from transformers import Glm4Config, Glm4MoeConfig, Glm4MoeLiteConfig
    from transformers import GlmConfig as HfGlmConfig

    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, rms_norm_eps=c.rms_norm_eps,
                  attention_bias=c.attention_bias, max_position_embeddings=c.max_position_embeddings,
                  tie_word_embeddings=c.tie_word_embeddings, pad_token_id=None)
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    m = c.moe
    experts = {} if m is None else dict(
        moe_intermediate_size=m.intermediate_size, n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k,
        n_shared_experts=m.n_shared_experts, n_group=m.n_group, topk_group=m.topk_group,
        norm_topk_prob=m.norm_topk_prob, routed_scaling_factor=m.routed_scaling_factor)
    if c.family == "glm4_moe_lite":
        a = c.mla
        return Glm4MoeLiteConfig(
            **common, **experts, num_key_value_heads=c.num_heads, rope_parameters=rope,
            rope_interleave=c.rotary_layout == "pairs", q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank,
            qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim,
            mlp_layer_types=["sparse" if c.is_moe_layer(i) else "dense" for i in range(c.num_layers)])
    gqa = dict(num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
               rope_parameters={**rope, "partial_rotary_factor": c.rotary_dim / c.head_dim})
    if c.family == "glm4_moe":
        return Glm4MoeConfig(**common, **experts, **gqa, use_qk_norm=c.qk_norm, first_k_dense_replace=m.first_k_dense,
                             num_nextn_predict_layers=0)
    return (Glm4Config if c.family == "glm4" else HfGlmConfig)(**common, **gqa)


def hf_state_dict(ckpt: Checkpoint, dtype: str):
    """The checkpoint's tensors under transformers' glm/glm4 names, in `dtype`."""
    import torch

    c, to = ckpt.config, getattr(torch, FLOATS[dtype].numpy)
    if c.moe is not None:  # the tensors as stored, experts stacked as transformers holds them in memory
        out = {}
        for role, s in ckpt.specs.items():
            if role == "lm_head" and c.tie_word_embeddings:
                continue
            cast = torch.float32 if s.fp32 else to
            if s.parts and not s.stacked:
                out.update({n: ckpt.load(n).to(cast) for n in s.parts[0]})
            else:
                out[s.name] = ckpt.load_weight(s).to(cast)
        return out
    if c.family != "chatglm":
        return {s.name: ckpt.load(s.name).to(to) for role, s in ckpt.specs.items()
                if not (role == "lm_head" and c.tie_word_embeddings)}
    sizes = [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
    glm_names = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
    layer_names = {"attn_norm": "input_layernorm.weight", "o": "self_attn.o_proj.weight",
                   "mlp_norm": "post_attention_layernorm.weight", "gate_up": "mlp.gate_up_proj.weight",
                   "down": "mlp.down_proj.weight"}
    out = {}
    for role, spec in ckpt.specs.items():
        if role == "lm_head" and c.tie_word_embeddings:
            continue
        t = ckpt.load(spec.name).to(to)
        if not role.startswith("layers."):
            out[glm_names[role]] = t
            continue
        _, i, part = role.split(".", 2)
        prefix = f"model.layers.{i}."
        if part in ("qkv", "qkv_bias"):
            kind = "weight" if part == "qkv" else "bias"
            for proj, piece in zip("qkv", torch.split(t, sizes, dim=0)):
                out[f"{prefix}self_attn.{proj}_proj.{kind}"] = piece.contiguous()
        else:
            out[prefix + layer_names[part]] = t
    return out


def load_reference(ckpt: Checkpoint, dtype: str):
    """transformers' model with the checkpoint's weights, built on the meta device (no double copy)."""
    import torch
    from transformers import Glm4ForCausalLM, Glm4MoeForCausalLM, Glm4MoeLiteForCausalLM, GlmForCausalLM

    cls = {"glm4": Glm4ForCausalLM, "glm4_moe": Glm4MoeForCausalLM,
           "glm4_moe_lite": Glm4MoeLiteForCausalLM}.get(ckpt.config.family, GlmForCausalLM)
    config = hf_config(ckpt.config)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = cls(config)
    state = hf_state_dict(ckpt, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (ckpt.config.tie_word_embeddings and m == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    if ckpt.config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # rebuild inv_freq off meta
    return model.eval()
