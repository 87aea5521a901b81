"""Tiny random-weight GLM checkpoints, made with transformers itself (names and layout are its own)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            pad_token_id=None, eos_token_id=[1, 2], bos_token_id=None)

# glm4_moe: 3 layers (the first dense), 8 experts top-2 in 4 groups of which 2 are kept, one shared expert,
# q/k norms; transformers' defaults otherwise (no attention bias unless asked)
TINY_MOE = dict(TINY, num_hidden_layers=3, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, use_qk_norm=True,
                attention_bias=True, routed_scaling_factor=1.5, norm_topk_prob=True, num_nextn_predict_layers=0)

# build overrides for a graph with the logits of every position (the default is the last position only), for
# comparisons of every position with the export or with transformers
EVERY_POSITION = {"shapes": {"logits": "all"}}


def left_padded(prompts: list[list[int]]):
    """A batch of prompts left-padded with 0: input ids, attention mask and position ids (numpy)."""
    import numpy as np

    longest = max(map(len, prompts))
    ids = np.array([[0] * (longest - len(p)) + p for p in prompts])
    mask = np.array([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, np.clip(np.cumsum(mask, 1) - 1, 0, None)


def hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers model whose biases and norm weights are not the 0/1 defaults."""
    from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

    cfg_cls, model_cls = {"glm": (GlmConfig, GlmForCausalLM), "glm4": (Glm4Config, Glm4ForCausalLM)}[family]
    torch.manual_seed(seed)
    return randomized(model_cls(cfg_cls(**{**TINY, **overrides})))


def randomized(model):
    """Biases, norm weights and the other weights drawn away from their 0/1 defaults; a MoE router's correction
    bias too, large enough to change which experts are chosen."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)
    return model.eval()


def hf_moe_model(seed: int = 0, **overrides):
    """A random transformers glm4_moe model with a non-zero correction bias, large enough to change which experts
    are chosen (so an exporter that drops it disagrees)."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    torch.manual_seed(seed)
    return randomized(Glm4MoeForCausalLM(Glm4MoeConfig(**{**TINY_MOE, **overrides})))


def save_stacked_experts(path: Path) -> Path:
    """Rewrite a saved glm4_moe checkpoint with transformers' in-memory stacked experts (`experts.gate_up_proj`
    [E, 2I, H], `experts.down_proj` [E, H, I]) instead of one tensor per expert."""
    import re

    from safetensors.torch import load_file, save_file

    sd = load_file(path / "model.safetensors")
    out, experts = {}, {}
    for name, t in sd.items():
        m = re.match(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight", name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            out[name] = t
    for prefix, per in experts.items():
        order = sorted(per)
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([per[e]["gate_proj"], per[e]["up_proj"]]) for e in order])
        out[f"{prefix}.down_proj"] = torch.stack([per[e]["down_proj"] for e in order])
    save_file(out, path / "model.safetensors")
    return path


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


def dynamo_export(model, path: Path, opset: int = 18) -> Path:
    """torch.onnx's dynamo export of a transformers GLM with a KV cache: a graph from another exporter,
    in trtglm's IO naming."""
    from transformers import DynamicCache

    layers, kv, d = model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim
    model.config._attn_implementation = "eager"

    class WithCache(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache(config=self.m.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
            return (out.logits, *[t for layer in out.cache.layers[:layers] for t in (layer.keys, layer.values)])

    b, s, p = 2, 3, 4
    args = (torch.randint(0, model.config.vocab_size, (b, s)), torch.ones(b, p + s, dtype=torch.long),
            torch.arange(p, p + s)[None].repeat(b, 1), tuple(torch.randn(b, kv, p, d) for _ in range(2 * layers)))
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past} for _ in range(2 * layers))}
    names = [f"{i}.{k}" for i in range(layers) for k in ("key", "value")]
    program = torch.onnx.export(WithCache(model), args, dynamic_shapes=dynamic, dynamo=True, opset_version=opset,
                                input_names=["input_ids", "attention_mask", "position_ids",
                                             *[f"past_key_values.{n}" for n in names]],
                                output_names=["logits", *[f"present.{n}" for n in names]])
    path.mkdir(parents=True)
    program.save(str(path / "model.onnx"), external_data=True)
    return path


def add_tokenizer(path: Path, vocab_size: int = 160) -> Path:
    """A small byte-level BPE with GLM-style special tokens, a chat template and generation_config stop tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:100])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + ["hello world"] * 20, trainer)
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = template
    fast.save_pretrained(path)
    eos = tok.token_to_id("<|endoftext|>")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos], "pad_token_id": eos}))
    return path


def one_layer_per_stage(export_dir: Path, dtype: str | None = None) -> str:
    """The smallest budget for a build of the export in `dtype` (default: the export's): every stage one layer."""
    import onnx_ir as ir

    from trtglm.core.graphs import graph_dtype
    from trtglm.engine.stage_graphs import map_layers
    from trtglm.engine.stage_plan import smallest_budget
    from trtglm.engine.staged_build import stage_cost

    exported = graph_dtype(export_dir / "model.onnx")
    return str(smallest_budget(map_layers(ir.load(export_dir / "model.onnx")), stage_cost(dtype or exported, exported)))
