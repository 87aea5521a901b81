"""Random-weight GLM checkpoints of any size, written shard by shard (for demos and benchmarks).

Names and config follow transformers' glm/glm4/glm4_moe layout (experts stacked, as transformers holds
them in memory); memory stays at one shard.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.dtypes import FLOATS
from .config import normalize
from .weights import stacked_as_stored, weight_specs


def glm4_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                head_dim: int | None = None, family: str = "glm4", max_positions: int = 4096) -> dict:
    return {
        "model_type": family, "architectures": ["Glm4ForCausalLM" if family == "glm4" else "GlmForCausalLM"],
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim or hidden // heads,
        "rms_norm_eps": 1e-5, "attention_bias": True, "hidden_act": "silu", "max_position_embeddings": max_positions,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        "tie_word_embeddings": False, "eos_token_id": [1, 2], "pad_token_id": 0, "torch_dtype": "float16",
    }


def glm4_moe_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                    experts: int, top_k: int, expert_intermediate: int, head_dim: int | None = None,
                    shared: int = 1, dense_layers: int = 1, max_positions: int = 4096) -> dict:
    """A glm4_moe config (GLM-4.5's choices: q/k norms, attention biases, one expert group)."""
    base = glm4_config(hidden, layers, heads, kv_heads, intermediate, vocab, head_dim, max_positions=max_positions)
    return {**base, "model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"], "n_routed_experts": experts,
            "num_experts_per_tok": top_k, "moe_intermediate_size": expert_intermediate, "n_shared_experts": shared,
            "first_k_dense_replace": dense_layers, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
            "routed_scaling_factor": 1.0, "use_qk_norm": True, "num_nextn_predict_layers": 0}


def glm4_moe_lite_config(hidden: int, layers: int, heads: int, intermediate: int, vocab: int, experts: int,
                         top_k: int, expert_intermediate: int, q_lora_rank: int | None, kv_lora_rank: int,
                         qk_nope: int, qk_rope: int, v_head: int, max_positions: int = 4096) -> dict:
    """A glm4_moe_lite config (GLM-4.7-Flash's layout: multi-head latent attention, the first layer dense)."""
    return {"model_type": "glm4_moe_lite", "architectures": ["Glm4MoeLiteForCausalLM"], "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "q_lora_rank": q_lora_rank,
            "kv_lora_rank": kv_lora_rank, "qk_nope_head_dim": qk_nope, "qk_rope_head_dim": qk_rope,
            "v_head_dim": v_head, "n_routed_experts": experts, "num_experts_per_tok": top_k,
            "moe_intermediate_size": expert_intermediate, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
            "norm_topk_prob": True, "routed_scaling_factor": 1.0, "rms_norm_eps": 1e-5, "attention_bias": False,
            "max_position_embeddings": max_positions, "rope_interleave": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False,
            "eos_token_id": [1, 2], "pad_token_id": 0, "torch_dtype": "float16"}


def write_random_checkpoint(path: str | Path, config: dict, dtype: str = "fp16", seed: int = 0,
                            shard_bytes: int = 1 << 30) -> Path:
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=False)
    to = getattr(torch, FLOATS[dtype].numpy)
    gen = torch.Generator().manual_seed(seed)
    specs = list(weight_specs(normalize(config)).values())
    shards, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            shards.append(list(current))  # the names only: each shard's tensors are freed once written
            save_file(current, path / f"shard-{len(shards)}.safetensors")
            current, size = {}, 0

    # experts in transformers' stacked layout; a dense glm4_moe MLP's gate and up apart, as stored
    tensors = {n: shape for spec in specs for n, shape in (stacked_as_stored(spec) if spec.stacked else spec)
               .stored().items()}
    for name, shape in tensors.items():
        if name.endswith("bias"):
            t = torch.randn(shape, generator=gen) * 0.1
        elif len(shape) == 1:
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * 0.02
        current[name] = t.to(to)
        size += current[name].numel() * current[name].element_size()
        if size >= shard_bytes:
            flush()
    flush()
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, name in enumerate(names):
        (path / f"shard-{i + 1}.safetensors").rename(path / (name if n > 1 else "model.safetensors"))
    if n > 1:
        index = {"metadata": {}, "weight_map": {k: names[i] for i, s in enumerate(shards) for k in s}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
