"""Every input a user or a file controls, fuzzed: recipe YAML, config.json, safetensors headers, manifest.json and
export.json, calibration text, the run command's flags, and the HTTP requests of `trtglm serve`. The property: the input is accepted, or refused with
trtglm's own error (one line, naming the file or flag); never another exception ("internal error").

`make test` runs a fixed number of examples from a fixed seed (the `ci` profile); `make fuzz` runs rounds of the
`fuzz` profile (new random examples each round) for FUZZ_MINUTES (HYPOTHESIS_PROFILE=fuzz; a failing example is
printed and kept in .hypothesis/ to be replayed first next time: add it here as an `@example` regression test).
"""

import json
import os
import struct

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trtglm.core.errors import TrtglmError

FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 1000))  # per property and round of `make fuzz`
settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=EXAMPLES, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile("fuzz" if FUZZ else "ci")


def slow(ci_examples: int):
    """A property whose every example runs a command (an export, a build, a generation): fewer examples."""
    return settings(max_examples=max(ci_examples, EXAMPLES // 20) if FUZZ else ci_examples)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                    | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


def refused_cleanly(call) -> None:
    """`call()` succeeds or raises trtglm's error with a one-line message; anything else fails the test."""
    try:
        call()
    except TrtglmError as e:
        assert str(e).strip() and "\n" not in str(e).split(" (")[0], repr(e)


def flag_sets(table: dict):
    """One to three of `table`'s flags, each with a value from its strategy."""
    return st.dictionaries(st.sampled_from(sorted(table)), st.just(None), min_size=1, max_size=3).flatmap(
        lambda keys: st.fixed_dictionaries({k: table[k] for k in keys}))


def nothing_left(out, name: str) -> bool:
    """A refused command left neither its output nor a temporary directory beside it."""
    return not (out / name).exists() and not [p for p in out.iterdir() if p.name.startswith(".")]


def _cli(args, capsys, flags: dict | None = None) -> tuple[int, str]:
    """`trtglm ARGS` with `flags` appended (a None value: a switch): its exit code and stderr."""
    from trtglm.cli import main

    for flag, value in (flags or {}).items():
        args = [*args, flag] + ([] if value is None else [str(value)])
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    return code, capsys.readouterr().err


def _refused_or_done(code: int, err: str, codes=(0, 1, 2, 3)) -> None:
    assert "internal error" not in err and "Traceback" not in err, err
    assert code in codes, (code, err)
    if code:  # trtglm's one line (then at most a hint), or click's usage error ending in its one line
        lines = err.strip().splitlines()
        errors = [i for i, line in enumerate(lines) if line.startswith("trtglm: ")]
        assert len(errors) == 1 and errors[0] >= len(lines) - 2 or code == 2 and lines[-1].startswith("Error: "), err


def mutate(document, path_and_value):
    """`document` (nested dicts) with the value at a key path replaced, deleted (None marker) or a key added."""
    out = json.loads(json.dumps(document))
    path, value, action = path_and_value
    node = out
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node
    if isinstance(node, dict):
        if action == "delete":
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return out


def key_paths(document, prefix=()):
    for key, value in document.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from key_paths(value, (*prefix, key))


def mutations(document):
    paths = sorted(key_paths(document)) + [("extra_section",), ("shapes", "max_seq_lenn")]
    return st.tuples(st.sampled_from(paths), JSON, st.sampled_from(["replace", "replace", "delete"]))


# ---------------------------------------------------------------- recipes

DEMO_RECIPE = yaml.safe_load(open(os.path.join(ROOT, "recipes", "demo-glm4-int8.yaml")))


@given(mutations(DEMO_RECIPE))
@example(((("builder", "targets"), 0, "replace")))
@example(((("accuracy",), {"\n": None}, "replace")))
@example(((("shapes", "max_seq_len"), 10**9, "replace")))
@example(((("shapes",), [], "replace")))
def test_recipe_mutations(tmp_path_factory, change):
    from trtglm.core.recipe import load_recipe

    f = tmp_path_factory.mktemp("r") / "r.yaml"
    f.write_text(yaml.safe_dump(mutate(DEMO_RECIPE, change)))
    refused_cleanly(lambda: load_recipe(f))


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@example(b"")
@example(b"\xff\xfe\x00bad")
@example(b"[1, 2]")
@example(b"shapes: [1\n")
def test_recipe_files_of_any_bytes(tmp_path_factory, data):
    from trtglm.core.recipe import load_recipe

    f = tmp_path_factory.mktemp("r") / "r.yaml"
    f.write_bytes(data)
    refused_cleanly(lambda: load_recipe(f))


# ---------------------------------------------------------------- config.json

TINY_CONFIG = json.load(open(os.path.join(ROOT, "models", "tiny-glm4", "config.json")))


@given(mutations(TINY_CONFIG))
@example(((("num_attention_heads",), 0, "replace")))
@example(((("num_key_value_heads",), 3, "replace")))
@example(((("hidden_size",), -256, "replace")))
@example(((("head_dim",), "32", "replace")))
@example(((("rope_parameters",), [1], "replace")))
def test_config_mutations(change):
    from trtglm.model.config import normalize

    refused_cleanly(lambda: normalize(mutate(TINY_CONFIG, change)))


MOE_CONFIG = json.load(open(os.path.join(ROOT, "models", "tiny-glm4-moe", "config.json")))
LITE_CONFIG = {"model_type": "glm4_moe_lite", "vocab_size": 160, "hidden_size": 64, "intermediate_size": 96,
               "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "q_lora_rank": 24,
               "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
               "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
               "mlp_layer_types": ["dense", "sparse", "sparse"], "rope_interleave": True,
               "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


@given(mutations(MOE_CONFIG))
@example(((("n_group",), 3, "replace")))
@example(((("num_experts_per_tok",), 0, "replace")))
@example(((("first_k_dense_replace",), -1, "replace")))
@example(((("routed_scaling_factor",), "2", "replace")))
def test_moe_config_mutations(change):
    from trtglm.model.config import normalize

    refused_cleanly(lambda: normalize(mutate(MOE_CONFIG, change)))


@given(mutations(LITE_CONFIG))
@example(((("mlp_layer_types",), 5, "replace")))
@example(((("mlp_layer_types",), ["sparse", "dense", "sparse"], "replace")))
@example(((("q_lora_rank",), "768", "replace")))
@example(((("rope_parameters",), {"partial_rotary_factor": 0.5}, "replace")))
def test_lite_config_mutations(change):
    from trtglm.model.config import normalize

    refused_cleanly(lambda: normalize(mutate(LITE_CONFIG, change)))


# ---------------------------------------------------------------- safetensors headers

def _safetensors(header: bytes, body: bytes = b"\0" * 64) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


@given(JSON)
@example({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}})
@example({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})
@example({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}})
@example({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})
@example({"w": ["F32"]})
@example([1, 2])
def test_safetensors_headers(tmp_path_factory, header):
    from trtglm.model.checkpoint import read_header

    f = tmp_path_factory.mktemp("s") / "model.safetensors"
    f.write_bytes(_safetensors(json.dumps(header).encode()))
    refused_cleanly(lambda: read_header(f))


@given(st.binary(max_size=64), st.integers(0, 2**64 - 1))
def test_safetensors_lying_lengths(tmp_path_factory, data, length):
    from trtglm.model.checkpoint import read_header

    f = tmp_path_factory.mktemp("s") / "model.safetensors"
    f.write_bytes(struct.pack("<Q", length) + data)
    refused_cleanly(lambda: read_header(f))


# ---------------------------------------------------------------- calibration text

@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode), st.sampled_from([".jsonl", ".txt"]))
@example(b"\xff\xfe\xfa", ".jsonl")
@example(b"[1]\n", ".jsonl")
@example(b'{"text": 5}\n', ".jsonl")
@example(b'{"text": null}\n', ".jsonl")
@example(b"", ".txt")
def test_calibration_files(tmp_path_factory, data, suffix):
    from trtglm.precision.calibration import read_texts

    f = tmp_path_factory.mktemp("c") / f"data{suffix}"
    f.write_bytes(data)
    refused_cleanly(lambda: read_texts(f))


# ---------------------------------------------------------------- manifest.json and export.json

@pytest.fixture(scope="module")
def built(checkpoints, tmp_path_factory):
    import shutil

    from models import add_tokenizer, one_layer_per_stage
    from trtglm.engine.build import build
    from trtglm.export.exporter import export

    root = tmp_path_factory.mktemp("fuzzbuild")
    shutil.copytree(checkpoints["glm4"], root / "ckpt")
    add_tokenizer(root / "ckpt")
    export(str(root / "ckpt"), root / "e", validate=False, max_seq_len=64)
    build(root / "e", root / "b", onnx_only=True)
    build(root / "e", root / "ball", onnx_only=True, overrides={"shapes": {"logits": "all"}})
    build(root / "e", root / "staged", onnx_only=True, overrides={"builder": {"max_memory": one_layer_per_stage(root / "e")}})
    return root


def _copy(src, dst):
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


MANIFEST_KEYS = ["max_seq_len", "io", "recipe", "files", "precision", "stage", "fusion", "profiles", "backend",
                 "source", "targets", "engine", "packed"]


@given(st.sampled_from(MANIFEST_KEYS), JSON, st.booleans())
@example("max_seq_len", "64", False)
@example("io", None, False)
@example("recipe", {"resolved": []}, False)
@example("max_seq_len", None, True)
@example("profiles", [{"\n": None}], False)
@example("packed", {"for": "gpu"}, False)
@example("packed", {"for": 1}, False)
def test_manifest_mutations(built, tmp_path_factory, key, value, truncate):
    from trtglm.engine.inspect import inspect_path, verify
    from trtglm.engine.pack import pack
    from trtglm.runtime.backends import open_backend

    b = _copy(built / "b", tmp_path_factory.mktemp("m") / "b")
    manifest = json.loads((b / "manifest.json").read_text())
    manifest[key] = value
    text = json.dumps(manifest)
    (b / "manifest.json").write_text(text[:len(text) // 2] if truncate else text)
    refused_cleanly(lambda: inspect_path(b))
    refused_cleanly(lambda: verify(b))
    refused_cleanly(lambda: open_backend(b, "auto"))
    refused_cleanly(lambda: pack(b, b.parent / "cpu", "cpu"))


STAGE_KEYS = ["index", "layers", "dir", "inputs", "outputs", "weight_bytes", "io", "profiles"]


@given(st.integers(0, 2), st.sampled_from(STAGE_KEYS), JSON, st.booleans())
@example(0, "dir", "../../etc", False)
@example(1, "layers", [1], False)
@example(0, "inputs", [], False)
@example(2, "dir", "00", True)
def test_staged_manifest_mutations(built, tmp_path_factory, stage, key, value, drop):
    """A staged build's manifest with a stage entry edited, added or dropped: refused with one line, or run."""
    from trtglm.engine.inspect import inspect_path, verify
    from trtglm.runtime.backends import open_backend

    b = _copy(built / "staged", tmp_path_factory.mktemp("sm") / "b")
    manifest = json.loads((b / "manifest.json").read_text())
    stages = manifest["stages"]
    if drop and stage < len(stages):
        del stages[stage]
    elif stage < len(stages):
        stages[stage][key] = value
    else:
        stages.append({**stages[-1], key: value})
    (b / "manifest.json").write_text(json.dumps(manifest))
    refused_cleanly(lambda: inspect_path(b))
    refused_cleanly(lambda: verify(b))

    def run():
        from trtglm.runtime.generate import generate

        backend, _ = open_backend(b, "auto")
        generate(backend, [[5, 6, 7]], max_new_tokens=2)

    refused_cleanly(run)


@given(st.sampled_from(["dtype", "max_seq_len", "config", "family", "files", "io", "opset"]), JSON)
@example("config", {"num_layers": "four"})
@example("max_seq_len", -1)
@example("files", {"sha256": [1]})
def test_export_json_mutations(built, tmp_path_factory, key, value):
    from trtglm.engine.build import plan_build

    e = _copy(built / "e", tmp_path_factory.mktemp("x") / "e")
    meta = json.loads((e / "export.json").read_text())
    meta[key] = value
    (e / "export.json").write_text(json.dumps(meta))
    refused_cleanly(lambda: plan_build(e, onnx_only=True))


# ---------------------------------------------------------------- trtglm run's flags

RUN_FLAGS = {"--max-new-tokens": st.integers(-5, 10**12), "--temperature": st.floats(-10, 1e30),
             "--top-k": st.integers(-5, 10**12), "--top-p": st.floats(-1, 10),
             "--repetition-penalty": st.floats(-5, 1e30), "--seed": st.integers(-5, 2**70)}


@given(flag_sets(RUN_FLAGS))
@example({"--temperature": 4.844944176335469e-199})
@example({"--temperature": float("nan")})
@example({"--repetition-penalty": 1e-300, "--temperature": 1.0})
@example({"--seed": -1})
@example({"--max-new-tokens": 0})
@example({"--top-p": 0.0})
@example({"--seed": 2**70})
def test_run_flags(built, capsys, flags):
    flags = {"--max-new-tokens": 2, **flags}
    if flags["--max-new-tokens"] > 4:
        flags["--max-new-tokens"] = 4  # the value's validity is what is fuzzed, not the time it takes
    code, err = _cli(["run", str(built / "b"), "--prompt", "hello", "--json"], capsys, flags)
    _refused_or_done(code, err, codes=(0, 1, 2))


def test_absurd_requests_are_refused_before_memory_is_allocated(built, capsys, monkeypatch):
    """10,000 prompts on a machine with 1 MiB to spare: refused with the size they need, before any step."""
    import trtglm.runtime.backends
    from trtglm.cli import main

    monkeypatch.setattr(trtglm.runtime.backends, "available_memory", lambda: 1 << 20)
    prompts = built / "prompts.txt"
    prompts.write_text("hello\n" * 10_000)
    with pytest.raises(SystemExit) as exc:
        main(["run", str(built / "b"), "--input-file", str(prompts), "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert exc.value.code not in (0, 70) and "internal error" not in err
    assert "10000 rows of" in err and "GiB" in err, err


# ---------------------------------------------------------------- build and export flags, prompt files

BUILD_FLAGS = {"--max-batch": st.integers(-2, 10**6).map(str), "--max-input-len": st.integers(-2, 10**6).map(str),
               "--max-seq-len": st.integers(-2, 10**9).map(str), "--calib-samples": st.integers(-2, 10**6).map(str),
               "--target": st.sampled_from(["sm89", "sm90", "", ",", "sm89,,sm86", "SM86", "x"]),
               "--fusions": st.sampled_from(["none", "rms_norm", "attention", "qkv,rotary", "bogus", ","]),
               "--logits": st.sampled_from(["all", "last", "some"]),
               "--kv-cache": st.sampled_from(["dynamic", "static", "paged"]),
               "--attention": st.sampled_from(["auto", "layer", "decomposed", "grouped", "x"]),
               "--max-memory": st.sampled_from(["12G", "0", "-1G", "1K", "1.5", "x", "1T", "1611276368", "9" * 30])
               | st.text(max_size=12)}


@slow(12)
@given(flag_sets(BUILD_FLAGS))
@example({"--max-seq-len": "1000000000"})
@example({"--max-batch": "0"})
def test_build_flags(built, tmp_path_factory, capsys, flags):
    out = tmp_path_factory.mktemp("bf")
    code, err = _cli(["build", str(built / "e"), "-o", str(out / "b"), "--onnx-only"], capsys, flags)
    _refused_or_done(code, err)
    if code:
        assert nothing_left(out, "b"), err


@given(st.binary(max_size=200))
@example(b"\xff\xfe\x00")
@example(b"\n\n\n")
def test_prompt_files(built, tmp_path_factory, capsys, data):
    f = tmp_path_factory.mktemp("p") / "prompts.txt"
    f.write_bytes(data)
    code, err = _cli(["run", str(built / "b"), "--input-file", str(f), "--max-new-tokens", "1"], capsys)
    assert "internal error" not in err and "Traceback" not in err, err
    assert code in (0, 1, 2), (code, err)


@given(st.sampled_from(["generation_config.json", "tokenizer.json"]), st.binary(max_size=80) | JSON.map(
    lambda v: json.dumps(v).encode()))
@example("generation_config.json", b'{"eos_token_id": "x"}')
@example("generation_config.json", b"\xff")
@example("tokenizer.json", b"{}")
def test_tokenizer_files(built, tmp_path_factory, name, data):
    from trtglm.model.tokenizer import load_text

    b = _copy(built / "b", tmp_path_factory.mktemp("t") / "b")
    (b / name).write_bytes(data)
    refused_cleanly(lambda: load_text(b))


# ---------------------------------------------------------------- checkpoints: shard indexes, config vs tensors

def _sharded(checkpoints, tmp_path_factory):
    return _copy(checkpoints["glm4-sharded"], tmp_path_factory.mktemp("sh") / "ckpt")


@given(st.sampled_from(["drop", "rename", "point", "value"]), st.integers(0, 10**6), JSON)
@example("point", 0, "../model.safetensors")
@example("point", 0, "\n")
@example("point", 0, "missing.safetensors")
@example("value", 0, {"weight_map": {"a": None}})
@example("value", 0, {"weight_map": []})
def test_shard_indexes(checkpoints, tmp_path_factory, action, which, value):
    from trtglm.model.checkpoint import open_checkpoint

    ckpt = _sharded(checkpoints, tmp_path_factory)
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    names = sorted(index["weight_map"])
    name = names[which % len(names)]
    if action == "drop":  # a tensor the index forgets
        del index["weight_map"][name]
    elif action == "rename":  # a tensor the index names under another name
        index["weight_map"][name + ".x"] = index["weight_map"].pop(name)
    elif action == "point":  # a tensor whose shard is another (or no) file
        index["weight_map"][name] = value if isinstance(value, str) else sorted(set(index["weight_map"].values()))[0]
    else:
        index = value
    index_file.write_text(json.dumps(index))
    refused_cleanly(lambda: open_checkpoint(ckpt))


@given(mutations(TINY_CONFIG))
@example(((("hidden_size",), 64, "replace")))
@example(((("vocab_size",), 10, "replace")))
@example(((("tie_word_embeddings",), True, "replace")))
@example(((("num_hidden_layers",), 9, "replace")))
def test_configs_against_their_tensors(tmp_path_factory, change):
    """A config.json edited so that it contradicts the checkpoint's tensors: refused naming the tensor or field."""
    refused_cleanly(lambda: _open_with_config(tmp_path_factory, "tiny-glm4", mutate(TINY_CONFIG, change)))


@given(mutations(MOE_CONFIG))
@example(((("n_routed_experts",), 4, "replace")))
@example(((("first_k_dense_replace",), 0, "replace")))
@example(((("num_nextn_predict_layers",), 1, "replace")))
@example(((("use_qk_norm",), False, "replace")))
def test_moe_configs_against_their_tensors(tmp_path_factory, change):
    """The shipped MoE model's config.json edited against its tensors (experts, dense layers, MTP, q/k norms)."""
    refused_cleanly(lambda: _open_with_config(tmp_path_factory, "tiny-glm4-moe", mutate(MOE_CONFIG, change)))


def _open_with_config(tmp_path_factory, model: str, config: dict):
    """open_checkpoint of a shipped model's weights under another config.json."""
    from trtglm.model.checkpoint import open_checkpoint

    ckpt = tmp_path_factory.mktemp("cfg") / "ckpt"
    ckpt.mkdir()
    os.symlink(os.path.join(ROOT, "models", model, "model.safetensors"), ckpt / "model.safetensors")
    (ckpt / "config.json").write_text(json.dumps(config))
    return open_checkpoint(ckpt)


# ---------------------------------------------------------------- export, eval, bench and inspect flags

EXPORT_FLAGS = {"--dtype": st.sampled_from(["fp32", "fp16", "bf16", "int8", ""]),
                "--opset": st.integers(-2, 10**4).map(str), "--max-seq-len": st.integers(-2, 10**12).map(str)}


@slow(8)
@given(flag_sets(EXPORT_FLAGS))
@example({"--max-seq-len": str(10**9)})
@example({"--opset": "17"})
@example({"--max-seq-len": "0"})
def test_export_flags(built, tmp_path_factory, capsys, flags):
    out = tmp_path_factory.mktemp("ef")
    code, err = _cli(["export", str(built / "ckpt"), "-o", str(out / "e"), "--no-validate"], capsys, flags)
    _refused_or_done(code, err)
    if "--max-seq-len" in flags and not 0 < int(flags["--max-seq-len"]) <= 256:  # the model's maximum
        assert code == 2, err
    if code:
        assert nothing_left(out, "e"), err


EVAL_FLAGS = {"--samples": st.integers(-2, 10**9).map(str), "--seq-len": st.integers(-2, 10**9).map(str),
              "--backend": st.sampled_from(["auto", "ort", "trt", "gpu"])}


@slow(12)
@given(flag_sets(EVAL_FLAGS),
    st.one_of(st.none(), st.binary(max_size=120), st.text(max_size=120).map(
        lambda t: json.dumps({"text": t}).encode())))
@example({"--samples": "1000000000", "--seq-len": "8"}, None)
@example({"--seq-len": "1000000000"}, None)
@example({"--samples": "1", "--seq-len": "8"}, b'{"text": ""}\n')
def test_eval_flags(built, tmp_path_factory, capsys, flags, data):
    flags = {"--samples": "2", **flags}
    if int(flags["--samples"]) > 2:
        flags["--samples"] = "2"  # the time it takes, not the value's validity
    if data is not None:
        f = tmp_path_factory.mktemp("ev") / "data.jsonl"
        f.write_bytes(data)
        flags["--data"] = str(f)
    code, err = _cli(["eval", str(built / "ball")], capsys, flags)
    _refused_or_done(code, err)


BENCH_FLAGS = {"--batch": st.integers(-2, 10**9).map(str), "--input-len": st.integers(-2, 10**9).map(str),
               "--output-len": st.integers(-2, 10**9).map(str), "--backend": st.sampled_from(["auto", "ort", "trt"]),
               "--cuda-graphs": st.just(None),
               "--devices": st.one_of(st.sampled_from(["0", "0,1", "1,1", "-1", "7", "x", ""]), st.text(max_size=8))}


@slow(12)
@given(flag_sets(BENCH_FLAGS))
@example({"--batch": "1000000"})
@example({"--input-len": "64", "--output-len": "1"})
@example({"--cuda-graphs": None})
@example({"--devices": "0,1", "--backend": "ort"})
@example({"--devices": "0,x"})
def test_bench_flags(built, capsys, monkeypatch, flags):
    import trtglm.runtime.backends

    # a batch that fits runs: 512 MiB keeps the ones that do small enough to run in a moment
    monkeypatch.setattr(trtglm.runtime.backends, "available_memory", lambda: 512 << 20)
    flags = {"--input-len": "4", "--output-len": "4", "--batch": "4", **flags}  # the time, not the validity
    code, err = _cli(["bench", str(built / "b"), "--json"], capsys, flags)
    _refused_or_done(code, err)


@given(st.sampled_from(["x.onnx", "x.engine", "x.plan", "x.txt", "dir/manifest.json", "dir/model.onnx"]),
       st.binary(max_size=300))
@example("x.onnx", b"")
@example("x.engine", b"ftrt" + b"\0" * 64)
@example("dir/manifest.json", b"{}")
def test_inspect_any_file(tmp_path_factory, capsys, name, data):
    root = tmp_path_factory.mktemp("in")
    f = root / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    target = f.parent if name.startswith("dir/") else f
    for command in (["inspect", str(target)], ["verify", str(target)], ["run", str(target), "--prompt", "x"],
                    ["pack", str(target), "-o", str(root / "packed"), "--for", "cpu"]):
        code, err = _cli(command, capsys)
        _refused_or_done(code, err)
    assert not (root / "packed").exists()


# ---------------------------------------------------------------- trtglm serve's HTTP requests

@pytest.fixture(scope="module")
def server(built):
    from test_serve import serving

    with serving(built / "b", "--model-name", "m", "--max-batch", "4", "--max-queue", "32") as (url, proc):
        yield url, proc


def _answered(server, path: str, body: bytes) -> None:
    """An OpenAI answer (200), or its error object with one clear line (400 bad request, 413 too large, 429 queue
    full), and the server still serving."""
    from test_serve import get, post

    url, proc = server
    status, headers, text = post(url, path, body)
    assert status in (200, 400, 413, 429), (status, text)
    if status == 200 and headers.get("content-type", "").startswith("text/event-stream"):
        assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text, text
    elif status == 200:
        assert json.loads(text)["choices"], text
    else:
        error = json.loads(text)["error"]
        assert error["message"].strip() and "\n" not in error["message"] and error["type"], error
    assert proc.poll() is None and get(url, "/health")[0] == 200


SAMPLED = {"model": st.sampled_from(["m", "gpt-4", ""]) | JSON, "max_tokens": st.integers(-3, 6) | JSON,
           "temperature": st.floats(allow_nan=True) | JSON, "top_p": st.floats(-1, 2) | JSON,
           "top_k": st.integers(-3, 10**20) | JSON, "seed": st.integers(-3, 2**70) | JSON,
           "n": st.integers(-1, 20) | JSON, "stop": st.lists(st.text(max_size=4), max_size=6) | JSON,
           "stop_token_ids": st.lists(st.integers(-3, 10**6), max_size=3) | JSON,
           "repetition_penalty": st.floats(allow_nan=True) | JSON, "stream": st.booleans() | JSON,
           "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
           "logprobs": JSON, "presence_penalty": JSON, "ignore_eos": st.booleans() | JSON, "unknown": JSON}
COMPLETION = SAMPLED | {"prompt": st.text(max_size=30) | st.lists(st.integers(-2, 300), max_size=5)
                        | st.lists(st.text(max_size=5), max_size=70) | JSON, "echo": JSON, "suffix": JSON}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"]) | JSON,
                                 "content": st.text(max_size=20) | JSON})
CHAT = SAMPLED | {"messages": st.lists(MESSAGE, max_size=4) | JSON, "max_completion_tokens": st.integers(-3, 6) | JSON}


def _request(table: dict, base: dict):
    return flag_sets(table).map(lambda changes: {**base, **changes})


def _bounded(body: dict) -> bytes:
    for key in ("max_tokens", "max_completion_tokens"):  # validity is fuzzed, not the time a long answer takes
        if type(body.get(key)) is int and body[key] > 6:
            body[key] = 6
    return json.dumps(body).encode()


@given(_request(COMPLETION, {"model": "m", "prompt": "hello", "max_tokens": 3}))
@example({"model": "m", "prompt": [-1]})
@example({"model": "m", "prompt": "hello", "n": 16, "stream": True, "stop": ["e"]})
@example({"model": "m", "prompt": ["a"] * 64, "n": 16})
@example({"model": "m", "prompt": "x", "temperature": 1e-300, "seed": 2**63 - 1})
def test_completion_requests(server, body):
    _answered(server, "/v1/completions", _bounded(body))


@given(_request(CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}))
@example({"model": "m", "messages": [{"role": "assistant", "content": None}]})
@example({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}], "stream": True})
def test_chat_requests(server, body):
    _answered(server, "/v1/chat/completions", _bounded(body))


@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode) | JSON.map(lambda v: json.dumps(v).encode()))
@example(b"")
@example(b"\xff\xfe")
@example(b'{"model": "m", "prompt": "a", "max_tokens": 1e400}')
def test_request_bodies_of_any_bytes(server, data):
    for path in ("/v1/completions", "/v1/chat/completions"):
        _answered(server, path, data)
