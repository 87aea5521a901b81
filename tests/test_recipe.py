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


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_plans_within_tensorrts_limits(path):
    """The shapes of each recipe pass `trtglm build`'s own checks for its model (int32 element counts of logits,
    attention scores and KV cache), so the recipe cannot be refused before building."""
    import dataclasses
    import json

    from trtglm.engine.builder import plan_shapes
    from trtglm.model.config import normalize

    r = load_recipe(path)
    if r.model.name == "tiny-glm4":
        config = dataclasses.asdict(normalize(json.loads((Path(__file__).parent.parent / "models" / "tiny-glm4" /
                                                          "config.json").read_text())))
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
