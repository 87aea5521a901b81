import pytest

from trtglm.core.errors import CheckpointError, UnsupportedCheckpoint
from trtglm.model.config import detect_family, normalize


def test_families_come_from_config_fields(checkpoints):
    import json

    for fam in ("glm", "glm4", "chatglm"):
        cfg = json.loads((checkpoints[fam] / "config.json").read_text())
        assert detect_family(cfg) == fam


def test_architectures_alone_is_enough():
    assert detect_family({"architectures": ["Glm4ForCausalLM"]}) == "glm4"
    assert detect_family({"architectures": ["GlmForCausalLM"]}) == "glm"


def test_unknown_family_lists_supported():
    with pytest.raises(UnsupportedCheckpoint, match=r"model_type='llama'.*supported families: glm .*glm4 .*chatglm"):
        detect_family({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def test_chatglm_v1_is_refused_clearly():
    with pytest.raises(UnsupportedCheckpoint, match="ChatGLM-6B v1"):
        detect_family({"model_type": "chatglm", "position_encoding_2d": True})


def test_chatglm_fields_are_normalized():
    c = normalize({"model_type": "chatglm", "num_layers": 40, "hidden_size": 4096, "ffn_hidden_size": 13696,
                   "num_attention_heads": 32, "multi_query_group_num": 2, "kv_channels": 128,
                   "padded_vocab_size": 151552, "layernorm_epsilon": 1.5625e-07, "rope_ratio": 500,
                   "seq_length": 131072, "add_qkv_bias": True})
    assert (c.num_kv_heads, c.head_dim, c.rotary_dim, c.rope_theta) == (2, 128, 64, 5_000_000.0)
    assert c.fused_qkv and not c.sandwich_norms


def test_rope_scaling_is_refused():
    with pytest.raises(UnsupportedCheckpoint, match="rope_type='yarn'"):
        normalize({"model_type": "glm4", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                   "num_hidden_layers": 1, "num_attention_heads": 2, "rope_parameters": {"rope_type": "yarn"}})


def test_heads_must_divide():
    with pytest.raises(CheckpointError, match="3 KV heads"):
        normalize({"model_type": "glm", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                   "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 3, "head_dim": 2})
