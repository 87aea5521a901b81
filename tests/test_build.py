"""`trtglm build` with TensorRT-RTX on the CPU: real engines, manifest, cache, interruption, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from trtglm.core.errors import TrtglmError
from trtglm.engine.build import build
from trtglm.export.exporter import export, sha256


@pytest.fixture(scope="module")
def fp16_export(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "e"
    export(str(checkpoints["glm4"]), out, dtype="fp16", validate=False, max_seq_len=256)
    return out


SMALL = {"shapes": {"max_batch": 2, "max_input_len": 32, "max_seq_len": 64}}


def test_engine_build_manifest_and_files(fp16_export, tmp_path):
    m = build(fp16_export, tmp_path / "b", overrides=SMALL, cache_dir=tmp_path / "cache")
    b = tmp_path / "b"
    assert {p.name for p in b.iterdir()} >= {"model.engine", "model.onnx", "model.onnx.data", "manifest.json",
                                              "layers.json", "build.log", "export.json"}
    assert m["stage"] == "engine" and m["backend"]["name"] == "tensorrt_rtx" and m["targets"] == ["sm89"]
    assert m["precision"]["dtype"] == "fp16" and m["cache"]["hit"] is False
    for name in ("model.engine", "model.onnx", "model.onnx.data"):
        assert m["files"]["sha256"][name] == sha256(b / name)
    assert m["source"]["export_sha256"] == json.loads((fp16_export / "export.json").read_text())["files"]["sha256"]
    (profile,) = m["profiles"]  # one profile covers prefill and decode; corners satisfy total = past + seq
    assert profile["input_ids"] == [[1, 1], [1, 1], [2, 32]]
    assert profile["past_key_values.0.key"] == [[1, 2, 0, 16], [1, 2, 32, 16], [2, 2, 63, 16]]
    assert profile["attention_mask"] == [[1, 1], [1, 33], [2, 95]]
    assert m["recipe"]["resolved"]["shapes"]["kv_cache"] == "dynamic"
    assert m["io"]["inputs"][0]["name"] == "input_ids"
    assert m["fusion"]["fused"]["attention"] == 2 and m["engine"]["kernels"] > 0
    assert m["estimate"]["kv_cache_bytes"] == 2 * 2 * 2 * 2 * 64 * 16 * 2
    assert m["recipe"]["resolved"]["shapes"]["max_seq_len"] == 64 and m["recipe"]["resolved_sha256"]
    layers = json.loads((b / "layers.json").read_text())
    assert any("mha" in layer["name"] for layer in layers["engine_layers"])
    assert "Layers:" in (b / "build.log").read_text()


def test_cache_hit_is_fast_and_identical(fp16_export, tmp_path):
    first = build(fp16_export, tmp_path / "a", overrides=SMALL, cache_dir=tmp_path / "cache")
    t = time.perf_counter()
    second = build(fp16_export, tmp_path / "b", overrides=SMALL, cache_dir=tmp_path / "cache")
    assert time.perf_counter() - t < 2.0
    assert second["cache"]["hit"] is True and second["cache"]["key"] == first["cache"]["key"]
    assert (tmp_path / "a" / "model.engine").read_bytes() == (tmp_path / "b" / "model.engine").read_bytes()
    other = build(fp16_export, tmp_path / "c", overrides={**SMALL, "builder": {"targets": "sm86"}},
                  cache_dir=tmp_path / "cache")
    assert other["cache"]["hit"] is False and other["cache"]["key"] != first["cache"]["key"]
    import shutil  # the same export elsewhere (another checkout): a hit whose manifest points at this export
    shutil.copytree(fp16_export, tmp_path / "moved")
    moved = build(tmp_path / "moved", tmp_path / "d", overrides=SMALL, cache_dir=tmp_path / "cache")
    assert moved["cache"]["hit"] is True and moved["source"]["export_dir"] == str((tmp_path / "moved").resolve())
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["source"] == moved["source"]


def test_changed_trtglm_code_is_a_cache_miss(fp16_export, tmp_path, monkeypatch):
    import trtglm.engine.build as build_module

    first = build(fp16_export, tmp_path / "a", overrides=SMALL, cache_dir=tmp_path / "cache")
    digest = build_module.source_digest()
    assert digest == build_module.source_digest() and len(digest) == 64  # stable for the same code
    monkeypatch.setattr(build_module, "source_digest", lambda: "0" * 64)  # as if a module had changed
    again = build(fp16_export, tmp_path / "b", overrides=SMALL, cache_dir=tmp_path / "cache")
    assert again["cache"]["hit"] is False and again["cache"]["key"] != first["cache"]["key"]


def test_split_profiles_double_the_engine(fp16_export, tmp_path):
    single = build(fp16_export, tmp_path / "a", overrides=SMALL, use_cache=False)
    split = build(fp16_export, tmp_path / "b", overrides={"shapes": {**SMALL["shapes"], "profiles": "split"}},
                  use_cache=False)
    assert [p["input_ids"][2] for p in split["profiles"]] == [[2, 32], [2, 1]]  # prefill, decode
    assert split["profiles"][1]["past_key_values.0.key"][2] == [2, 2, 63, 16]
    assert split["profile_names"] == ["prefill", "decode"] and single["profile_names"] == ["prefill+decode"]
    assert split["engine"]["bytes"] > 1.5 * single["engine"]["bytes"]  # one Myelin graph (and weights) each


def test_several_targets_in_one_engine(fp16_export, tmp_path):
    one = build(fp16_export, tmp_path / "a", overrides=SMALL, use_cache=False)
    two = build(fp16_export, tmp_path / "b", overrides={**SMALL, "builder": {"targets": "sm80,sm120"}},
                use_cache=False)
    # the tiny model's engines differ by a few bytes at most (TensorRT-RTX compiles its kernels on the GPU)
    assert two["targets"] == ["sm80", "sm120"] and two["files"]["sha256"]["model.engine"] != one["files"]["sha256"][
        "model.engine"]


def test_fp32_engine_needs_decomposable_attention(exports, tmp_path):
    m = build(exports["glm"], tmp_path / "b", overrides={**SMALL, "builder": {"targets": "sm80"}}, use_cache=False)
    assert m["precision"]["dtype"] == "fp32" and (tmp_path / "b" / "model.engine").stat().st_size > 0


@pytest.mark.parametrize("overrides,message", [
    ({"builder": {"targets": "sm90"}}, "TensorRT-RTX cannot build for sm90"),
    ({"builder": {"targets": "sm75"}, "precision": {"dtype": "bf16"}}, "precision bf16 requested but"),
    ({"precision": {"dtype": "int8"}}, "precision conversion starts from an fp32 export"),
    ({"shapes": {"max_seq_len": 100000}}, "exceeds the export's max_seq_len 256"),
    ({"shapes": {"max_batch": 100000, "max_input_len": 256, "max_seq_len": 256}}, "over TensorRT.s int32 limit"),
])
def test_refused_before_building(fp16_export, tmp_path, overrides, message):
    with pytest.raises(TrtglmError, match=message):
        build(fp16_export, tmp_path / "b", overrides=overrides, use_cache=False)
    assert list(tmp_path.iterdir()) == []


def test_bf16_and_fp32_target_rules():
    from trtglm.engine.tensorrt import check_targets

    with pytest.raises(TrtglmError, match="bf16 needs SM80"):
        check_targets(("sm75", "sm89"), "bf16", "tensorrt_rtx")
    with pytest.raises(TrtglmError, match="fp8 needs SM89"):
        check_targets(("sm86",), "fp8", "tensorrt_rtx")
    with pytest.raises(TrtglmError, match="sm75 has no fp32 GEMM"):
        check_targets(("sm75",), "fp32", "tensorrt_rtx")
    check_targets(("sm90",), "fp16", "tensorrt")  # the full TensorRT builds for the GPU it runs on


def test_ctrl_c_during_the_tensorrt_build_cancels_cleanly(fp16_export, tmp_path):
    from trtglm.core.progress import Progress

    class InterruptOnFirstStep(Progress):
        sent = False

        def update(self, *a, **k):
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)

    from trtglm.engine.builder import BuildCancelled

    with pytest.raises(BuildCancelled):
        build(fp16_export, tmp_path / "b", overrides=SMALL, use_cache=False, progress=InterruptOnFirstStep())
    assert list(tmp_path.iterdir()) == []


def test_killed_build_leaves_no_build_dir(fp16_export, tmp_path):
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "trtglm", "build", str(fp16_export), "-o", str(out), "--no-cache",
                             "--target", "sm80,sm86,sm89,sm120"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any((p / "model.onnx").exists() for p in tmp_path.glob(".b.tmp-*")):
        assert proc.poll() is None, "the build ended before it could be killed"
        time.sleep(0.02)
    assert time.time() < deadline, "the build never started writing"
    assert proc.poll() is None, "the build finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()


def test_cli_engine_build_and_errors(fp16_export, tmp_path, capsys):
    from trtglm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["build", str(fp16_export), "-o", str(tmp_path / "b"), "--no-cache", "--max-input-len", "32",
              "--max-seq-len", "64", "--target", "sm90"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "cannot build for sm90" in err and "Traceback" not in err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("builder:\n  targts: [sm89]\n")
    with pytest.raises(SystemExit) as e:
        main(["build", str(fp16_export), "-o", str(tmp_path / "b"), "--recipe", str(recipe)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "did you mean 'targets'" in err and str(recipe) in err
    assert not (tmp_path / "b").exists()


def test_cli_attention_flag(fp16_export, tmp_path, capsys):
    from trtglm.cli import main

    main(["build", str(fp16_export), "-o", str(tmp_path / "b"), "--no-cache", "--max-input-len", "32",
          "--max-seq-len", "64", "--attention", "layer"])
    assert "attention as TensorRT's attention layer" in capsys.readouterr().out
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["recipe"]["resolved"]["builder"]["attention"] == "layer" and m["engine_graph"]["file"] == "model.onnx"
    with pytest.raises(SystemExit) as e:
        main(["build", str(fp16_export), "-o", str(tmp_path / "c"), "--attention", "fused"])
    assert e.value.code == 2 and "'fused' is not one of" in capsys.readouterr().err


def test_concurrent_builds_of_one_key_build_once(fp16_export, tmp_path):
    """Two processes, same export and recipe, same cache: the file lock makes one build and the other reuse it."""
    cmd = [sys.executable, "-m", "trtglm", "build", str(fp16_export), "--cache-dir", str(tmp_path / "cache"),
           "--max-input-len", "32", "--max-seq-len", "64", "--json"]
    procs = [subprocess.Popen([*cmd, "-o", str(tmp_path / name)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for name in ("a", "b")]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    hits = sorted(json.loads(out)["cache"]["hit"] for out, _ in results)
    assert hits == [False, True]
    assert (tmp_path / "a" / "model.engine").read_bytes() == (tmp_path / "b" / "model.engine").read_bytes()
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == [
        json.loads(results[0][0])["cache"]["key"]]


def test_every_parser_error_is_reported(tmp_path):
    """A graph the parser refuses in several places: all of them are listed."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from trtglm.engine.builder import BuildError, build_engine

    nodes = [helper.make_node("Attention", ["q", "k", "v"], [f"o{i}"], softmax_precision=1) for i in range(3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [1, 2, 4, 8])
                                           for n in "qkv"],
                              [helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT16, None) for i in range(3)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=11), tmp_path / "m.onnx")
    with pytest.raises(BuildError) as e:
        build_engine(tmp_path / "m.onnx", profiles=[])
    assert len(e.value.errors) == 3 and str(e.value).count("softmax precision") == 3
    assert np.all([("\n  " + err) in str(e.value) for err in e.value.errors])
