"""Tiny random-weight GLM checkpoints, made with transformers itself (names and layout are its own)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            pad_token_id=None, eos_token_id=[1, 2], bos_token_id=None)


def hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers model whose biases and norm weights are not the 0/1 defaults."""
    from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

    cfg_cls, model_cls = {"glm": (GlmConfig, GlmForCausalLM), "glm4": (Glm4Config, Glm4ForCausalLM)}[family]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
    return model.eval()


def save_hf(model, path: Path, dtype=torch.float32, max_shard_size=None) -> Path:
    model.to(dtype).save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    model.to(torch.float32)
    return path


def save_chatglm(glm_model, path: Path) -> Path:
    """The remote-code ChatGLM layout of the same network: renamed tensors, fused query_key_value."""
    from safetensors.torch import save_file

    c = glm_model.config
    sd = {k: v.detach().clone() for k, v in glm_model.state_dict().items()}
    out = {"transformer.embedding.word_embeddings.weight": sd.pop("model.embed_tokens.weight"),
           "transformer.encoder.final_layernorm.weight": sd.pop("model.norm.weight"),
           "transformer.output_layer.weight": sd.pop("lm_head.weight"),
           "transformer.rotary_pos_emb.inv_freq": torch.ones(c.head_dim // 4)}
    for i in range(c.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}self_attention.query_key_value.{kind}"] = torch.cat(
                [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
        out[f"{dst}self_attention.dense.weight"] = sd.pop(f"{src}self_attn.o_proj.weight")
        out[f"{dst}input_layernorm.weight"] = sd.pop(f"{src}input_layernorm.weight")
        out[f"{dst}post_attention_layernorm.weight"] = sd.pop(f"{src}post_attention_layernorm.weight")
        out[f"{dst}mlp.dense_h_to_4h.weight"] = sd.pop(f"{src}mlp.gate_up_proj.weight")
        out[f"{dst}mlp.dense_4h_to_h.weight"] = sd.pop(f"{src}mlp.down_proj.weight")
    assert not sd, sd.keys()
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in out.items()}, path / "model.safetensors")
    config = {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "ffn_hidden_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads, "multi_query_attention": True,
        "multi_query_group_num": c.num_key_value_heads, "kv_channels": c.head_dim,
        "padded_vocab_size": c.vocab_size, "layernorm_epsilon": c.rms_norm_eps, "rmsnorm": True,
        "add_qkv_bias": True, "add_bias_linear": False, "apply_residual_connection_post_layernorm": False,
        "post_layer_norm": True, "rope_ratio": c.rope_parameters["rope_theta"] / 10000.0,
        "seq_length": c.max_position_embeddings, "torch_dtype": "float32", "eos_token_id": [1, 2],
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
