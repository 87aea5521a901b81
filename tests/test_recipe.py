from pathlib import Path

import pytest

from trtglm.core.recipe import Recipe, RecipeError, load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 7


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    r = load_recipe(path)
    assert isinstance(r, Recipe) and r.builder.targets


@pytest.mark.parametrize("text,message", [
    ("builder:\n  targts: [sm89]\n", "builder.targts: unknown field (did you mean 'targets'?)"),
    ("precison:\n  dtype: fp16\n", "precison: unknown field (did you mean 'precision'?)"),
    ("shapes:\n  max_input_len: 4096\n  max_seq_len: 1024\n", "max_input_len 4096 exceeds max_seq_len 1024"),
    ("builder:\n  targets: [sm99]\n", "builder.targets: unknown target 'sm99'"),
    ("precision:\n  dtype: int3\n", "precision.dtype: Input should be"),
    ("builder:\n  optimization_level: 9\n", "builder.optimization_level"),
    ("shapes:\n  max_batch: 0\n", "shapes.max_batch"),
    ("- just\n- a list\n", "a recipe is a mapping of sections"),
    ("builder: [oops\n", "not valid YAML"),
])
def test_malformed_recipe_names_file_and_field(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert str(e.value).startswith(str(f)) and message in str(e.value)


def test_flags_override_recipe_override_defaults(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("shapes:\n  max_batch: 4\n  max_seq_len: 512\n  max_input_len: 256\nbuilder:\n  targets: [sm86]\n")
    r = load_recipe(f, {"shapes": {"max_batch": 2, "max_input_len": None}, "builder": {"targets": "sm80,sm89"}})
    assert r.shapes.max_batch == 2 and r.shapes.max_seq_len == 512 and r.builder.targets == ("sm80", "sm89")
    assert load_recipe().shapes.max_batch == 1


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


# Published config.json values of the models the shipped recipes are for (GLM-4-9B-0414 and glm-4-9b-chat agree).
GLM4_9B = {"vocab_size": 151552, "num_layers": 40, "num_heads": 32, "num_kv_heads": 2, "head_dim": 128,
           "hidden_size": 4096}


# zai-org/GLM-4.5-Air's published config.json
GLM_45_AIR = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": True,
    "first_k_dense_replace": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 10944, "max_position_embeddings": 131072, "moe_intermediate_size": 1408, "n_group": 1,
    "n_routed_experts": 128, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 96,
    "num_experts_per_tok": 8, "num_hidden_layers": 46, "num_key_value_heads": 8, "num_nextn_predict_layers": 1,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05, "rope_theta": 1000000, "routed_scaling_factor": 1.0,
    "tie_word_embeddings": False, "topk_group": 1, "use_qk_norm": False, "vocab_size": 151552}


# zai-org/GLM-4.7-Flash's config.json (transformers' Glm4MoeLiteConfig defaults are its values)
GLM_47_FLASH = {
    "architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite", "vocab_size": 154880,
    "hidden_size": 2048, "intermediate_size": 10240, "moe_intermediate_size": 1536, "num_hidden_layers": 47,
    "num_attention_heads": 20, "num_key_value_heads": 20, "n_shared_experts": 1, "n_routed_experts": 64,
    "routed_scaling_factor": 1.8, "kv_lora_rank": 512, "q_lora_rank": 768, "qk_rope_head_dim": 64, "v_head_dim": 256,
    "qk_nope_head_dim": 192, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 4, "norm_topk_prob": True,
    "max_position_embeddings": 202752, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_interleave": True,
    "attention_bias": False, "num_nextn_predict_layers": 1,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
MOE_CONFIGS = {"glm-4.5-air": GLM_45_AIR, "glm-4.7-flash": GLM_47_FLASH}


def _layer_map(config: dict):
    """The export's layers and their fp32 bytes, from the model's config alone (its graph without weights)."""
    from trtglm.engine.stage_graphs import map_layers
    from trtglm.model.config import normalize
    from trtglm.model.decoder import build_decoder
    from trtglm.model.weights import weight_specs

    c = normalize(config)
    return map_layers(build_decoder(c, weight_specs(c), lambda spec: pytest.fail(f"{spec.name} was read"),
                                    dtype="fp32"))


def test_glm_47_flash_int4_stages_fit_a_24_gib_build_machine():
    from trtglm.core.memory import parse_size
    from trtglm.engine.stage_plan import plan_stages, smallest_budget
    from trtglm.engine.staged_build import stage_cost

    r = load_recipe(Path(__file__).parent.parent / "recipes" / "glm-4.7-flash-int4.yaml")
    layers = _layer_map(GLM_47_FLASH)
    assert round(sum(layers.layer_bytes) + layers.head_bytes + layers.tail_bytes, -9) == 120e9  # fp32 export
    plan = plan_stages(layers, parse_size(r.builder.max_memory), stage_cost("int4", "fp32"))
    assert len(plan.ranges) == 10 and 21.8 < plan.peak / 2**30 < 21.9
    assert 8.5 < smallest_budget(layers, stage_cost("int4", "fp32")) / 2**30 < 8.6


def test_glm_45_air_int4_stages_fit_a_24_gib_build_machine():
    """The staged plan of the recipe, from the model's config alone (its graph without weights): every stage's
    conversion and engine build within 24 GiB, as the recipe's comment says; int8 and fp16 would not fit."""
    from trtglm.engine.stage_plan import plan_stages, smallest_budget
    from trtglm.engine.staged_build import stage_cost

    r = load_recipe(Path(__file__).parent.parent / "recipes" / "glm-4.5-air-int4.yaml")
    layers = _layer_map(GLM_45_AIR)
    assert round(sum(layers.layer_bytes) + layers.head_bytes + layers.tail_bytes, -9) == 427e9  # fp32 export
    from trtglm.core.memory import parse_size

    plan = plan_stages(layers, parse_size(r.builder.max_memory), stage_cost("int4", "fp32"))
    assert len(plan.ranges) == 45 and 22.0 < plan.peak / 2**30 < 22.1  # the largest stage: layers 0-1, the embedding
    assert 20.5 < smallest_budget(layers, stage_cost("int4", "fp32")) / 2**30 < 20.6  # one layer per stage
    for dtype in ("int8", "fp16"):
        assert smallest_budget(layers, stage_cost(dtype, "fp32")) > 24 << 30


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_plans_within_tensorrts_limits(path):
    """The shapes of each recipe pass `trtglm build`'s own checks for its model (int32 element counts of logits,
    attention scores and KV cache), so the recipe cannot be refused before building."""
    import dataclasses
    import json

    from trtglm.engine.builder import plan_shapes
    from trtglm.model.config import normalize

    r = load_recipe(path)
    if r.model.name.startswith("tiny-glm4"):
        config = dataclasses.asdict(normalize(json.loads((Path(__file__).parent.parent / "models" / r.model.name /
                                                          "config.json").read_text())))
    elif r.model.name in MOE_CONFIGS:
        config = dataclasses.asdict(normalize(MOE_CONFIGS[r.model.name]))
    else:
        assert r.model.name.startswith("glm-4-9b"), r.model.name
        config = GLM4_9B
    io = {"inputs": [{"name": n} for n in ("input_ids", "attention_mask", "position_ids", "past_key_values.0.key")]}
    plan = plan_shapes(io, config, r.shapes, 2)
    assert plan.kv_cache_bytes > 0


@pytest.mark.parametrize("value", ["0", "true", "{a: 1}", "3.5"])
def test_targets_of_the_wrong_type_name_the_field(tmp_path, value):
    from trtglm.core.recipe import RecipeError, load_recipe

    f = tmp_path / "r.yaml"
    f.write_text(f"builder:\n  targets: {value}\n")
    with pytest.raises(RecipeError, match=r"r.yaml: builder.targets: a list of targets"):
        load_recipe(f)
