"""The CLI contract: --help/--version, and every bad input gives one clear line, a non-zero exit,
no traceback, and leaves no output (or temporary) directory behind."""

import json
import shutil
import subprocess
import sys

import pytest

from trtglm.cli import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def run_ok(capsys, *args):
    try:
        main(list(args))
    except SystemExit as e:  # click exits 0 after --help/--version
        assert e.code in (0, None), capsys.readouterr()
    return capsys.readouterr()


def assert_clean_failure(code, err, parent, pattern):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("hint:")]
    assert len(lines) == 1 and lines[0].startswith("trtglm: error:"), err
    assert pattern in lines[0], err
    assert "Traceback" not in err
    assert not [p for p in parent.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def test_module_entry_point_help_and_version():
    r = subprocess.run([sys.executable, "-m", "trtglm", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "trtglm, version" in r.stdout
    r = subprocess.run([sys.executable, "-m", "trtglm", "export", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--max-seq-len" in r.stdout and "--no-validate" in r.stdout


def test_export_json_output(capsys, checkpoints, tmp_path):
    out = run_ok(capsys, "export", str(checkpoints["glm"]), "-o", str(tmp_path / "e"), "--json", "--no-validate")
    meta = json.loads(out.out)
    assert meta["family"] == "glm" and meta["validation"]["status"] == "skipped"
    assert json.loads((tmp_path / "e" / "export.json").read_text())["family"] == "glm"


def test_human_output_reports_validation(capsys, checkpoints, tmp_path):
    out = run_ok(capsys, "export", str(checkpoints["chatglm"]), "-o", str(tmp_path / "e"))
    assert "exported chatglm" in out.out and "validation: max |logits diff|" in out.out


def broken(checkpoints, tmp_path, edit):
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoints["glm"], d)
    edit(d)
    return d


def _set_config(d, **fields):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(d, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    fn(tensors)
    save_file(tensors, d / "model.safetensors")


def _truncate(d):
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])


BAD = {
    "no config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "bad json": (lambda d: (d / "config.json").write_text("{oops"), "not valid JSON"),
    "unknown model_type": (lambda d: _set_config(d, model_type="llama", architectures=["LlamaForCausalLM"]),
                           "unsupported checkpoint: model_type='llama'"),
    "missing tensor": (lambda d: _rewrite_tensors(d, lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
                       "missing 1 tensor(s): model.layers.1.mlp.down_proj.weight"),
    "misshaped tensor": (lambda d: _rewrite_tensors(d, lambda t: t.update(
        {"model.layers.0.self_attn.k_proj.weight": t["model.layers.0.self_attn.k_proj.weight"][:16]})),
        "model.layers.0.self_attn.k_proj.weight is [16, 64], expected [32, 64]"),
    "unexpected tensor": (lambda d: _rewrite_tensors(d, lambda t: t.update(
        {"model.layers.0.extra.weight": t["model.norm.weight"].clone()})), "unexpected 1 tensor(s)"),
    "truncated safetensors": (_truncate, "truncated"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no *.safetensors files"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint(case, capsys, checkpoints, tmp_path):
    edit, pattern = BAD[case]
    d = broken(checkpoints, tmp_path, edit)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "e"
    code, _, err = run(capsys, "export", str(d), "-o", str(out))
    assert not out.exists()
    assert_clean_failure(code, err, tmp_path / "out", pattern)


def test_missing_directory_and_offline_hub_id(capsys, tmp_path, monkeypatch):
    code, _, err = run(capsys, "export", str(tmp_path / "nope"), "-o", str(tmp_path / "e"))
    assert_clean_failure(code, err, tmp_path, "no such directory")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "export", "no-such-org/no-such-glm", "-o", str(tmp_path / "e"))
    assert_clean_failure(code, err, tmp_path, "could not be downloaded from the hub")
    assert "hint: download it on a machine with network access" in err


def test_existing_output_needs_force(capsys, checkpoints, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    code, _, err = run(capsys, "export", str(checkpoints["glm"]), "-o", str(out), "--no-validate")
    assert_clean_failure(code, err, tmp_path, "already exists")
    assert "hint: pass --force" in err and (out / "precious.txt").read_text() == "user data"
    run_ok(capsys, "export", str(checkpoints["glm"]), "-o", str(out), "--no-validate", "--force")
    assert (out / "model.onnx").is_file() and not (out / "precious.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unwritable_output(capsys, checkpoints, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "export", str(checkpoints["glm"]), "-o", str(blocker / "e"))
    assert_clean_failure(code, err, tmp_path, "cannot write to")


@pytest.mark.parametrize("args,pattern", [(["--opset", "17"], "--opset 17"),
                                          (["--max-seq-len", "100000"], "--max-seq-len 100000")])
def test_impossible_options(args, pattern, capsys, checkpoints, tmp_path):
    code, _, err = run(capsys, "export", str(checkpoints["glm"]), "-o", str(tmp_path / "e"), *args)
    assert code == 2
    assert_clean_failure(code, err, tmp_path, pattern)


def test_failed_validation_leaves_nothing(capsys, checkpoints, tmp_path, monkeypatch):
    import trtglm.export.validate

    monkeypatch.setitem(trtglm.export.validate.TOLERANCE, "fp32", 0.0)
    code, _, err = run(capsys, "export", str(checkpoints["glm"]), "-o", str(tmp_path / "e"))
    assert_clean_failure(code, err, tmp_path, "differs from the transformers reference")
    assert not (tmp_path / "e").exists()


def test_interrupt_mid_export_leaves_nothing(capsys, checkpoints, tmp_path, monkeypatch):
    import trtglm.export.exporter

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trtglm.export.exporter, "run_validation", interrupted)
    code, _, err = run(capsys, "export", str(checkpoints["glm"]), "-o", str(tmp_path / "e"))
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(checkpoints, tmp_path):
    r = subprocess.run([sys.executable, "-m", "trtglm", "--debug", "export", str(tmp_path / "nope"),
                        "-o", str(tmp_path / "e")], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


def test_validation_that_cannot_fit_in_memory_fails_before_writing(capsys, checkpoints, tmp_path, monkeypatch):
    import trtglm.core.memory

    monkeypatch.setattr(trtglm.core.memory, "available_memory", lambda: 1 << 20)
    code, _, err = run(capsys, "export", str(checkpoints["glm"]), "-o", str(tmp_path / "e"))
    assert_clean_failure(code, err, tmp_path, "validation needs about")
    assert "--no-validate" in err and not (tmp_path / "e").exists()


def test_every_recipe_field_has_a_build_flag_or_is_recipe_only():
    from trtglm.cli import BUILD_FLAGS, RECIPE_ONLY
    from trtglm.core.recipe import field_paths

    flagged = set(BUILD_FLAGS.values()) | {"precision.dtype"}  # --fp32, --fp16, ... --fp8
    assert not flagged & RECIPE_ONLY
    assert flagged | RECIPE_ONLY == set(field_paths()), "a recipe field is in neither list"


def test_build_flags_take_the_schemas_choices(capsys):
    import typing

    from trtglm.cli import BUILD_FLAGS, build_cmd
    from trtglm.core.recipe import recipe_field

    options = {o.name: o for o in build_cmd.params}
    for flag, path in BUILD_FLAGS.items():
        option = options["recipe__" + path.replace(".", "__")]
        kind = recipe_field(path).annotation
        literals = [a for a in (kind, *typing.get_args(kind)) if typing.get_origin(a) is typing.Literal]
        if literals and typing.get_origin(kind) is not tuple:
            assert list(option.type.choices) == [str(a) for a in typing.get_args(literals[0])], flag
        assert path in option.help, flag
