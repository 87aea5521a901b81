"""Builds in stages (engine/stage_graphs.py, stage_plan.py, staged_build.py): the chain of stage graphs computes
what the whole graph does (ONNX Runtime, fp32: prefill of a left-padded batch, then decode steps, both KV cache
kinds, every-position and last-position logits), the budget decides the stages, a staged TensorRT-RTX build has
one engine per stage, and a budget or disk that cannot hold the build is refused before any work."""

import json

import numpy as np
import onnx_ir as ir
import pytest

from models import hf_model, left_padded, one_layer_per_stage, save_hf
from trtglm.cli import main
from trtglm.core.errors import TrtglmError, UsageError
from trtglm.core.memory import parse_size
from trtglm.engine.build import build
from trtglm.engine.stage_graphs import LayerMap
from trtglm.engine.stage_plan import BUILD_BASE_BYTES, BUILD_FACTOR, StageCost, build_peak, plan_stages, smallest_budget
from trtglm.export.exporter import export
from trtglm.runtime.backends import OrtBackend, open_backend
from trtglm.runtime.generate import generate
from trtglm.runtime.staged import StagedBackend

PROMPTS = [[5, 17, 99, 3, 42, 8, 150], [11, 12], [77, 1, 60, 61]]


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 5-layer GLM-4 export (fp32, with a tokenizer for calibration): cut into 2 and into 5 stages."""
    from models import add_tokenizer

    root = tmp_path_factory.mktemp("deep")
    ckpt = save_hf(hf_model("glm4", seed=3, num_hidden_layers=5), root / "ckpt")
    add_tokenizer(ckpt)
    export(str(ckpt), root / "e", validate=False, max_seq_len=48)
    return root / "e"


def assert_same_steps(whole, staged, atol=1e-5):
    """Prefill of a left-padded batch, then 3 decode steps: the same logits."""
    ids, mask, pos = left_padded(PROMPTS)
    a, cache_a = whole.forward(ids, mask, pos, whole.new_cache(3))
    b, cache_b = staged.forward(ids, mask, pos, staged.new_cache(3))
    np.testing.assert_allclose(b, a, atol=atol, rtol=0)
    for step in range(3):
        mask, pos = np.concatenate([mask, np.ones((3, 1), np.int64)], 1), pos[:, -1:] + 1
        token = np.array([[3 + step], [40], [7 * step]])
        a, cache_a = whole.forward(token, mask, pos, cache_a)
        b, cache_b = staged.forward(token, mask, pos, cache_b)
        np.testing.assert_allclose(b, a, atol=atol, rtol=0)


@pytest.mark.parametrize("family", ["glm", "glm4", "chatglm"])
@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
@pytest.mark.parametrize("logits", ["all", "last"])
def test_stages_compute_what_the_whole_graph_does(exports, tmp_path, family, kv_cache, logits):
    shapes = {"shapes": {"kv_cache": kv_cache, "logits": logits, "max_seq_len": 48}}
    build(exports[family], tmp_path / "whole", onnx_only=True, overrides=shapes)
    budget = one_layer_per_stage(exports[family])
    manifest = build(exports[family], tmp_path / "staged", onnx_only=True,
                     overrides={**shapes, "builder": {"max_memory": budget}})
    assert [s["layers"] for s in manifest["stages"]] == [[0, 1], [1, 2]]
    assert not (tmp_path / "staged" / "model.onnx").exists()  # the weights are kept once, in the stages
    staged = OrtBackend.from_build(tmp_path / "staged")
    assert isinstance(staged, StagedBackend) and len(staged.stages) == 2
    assert staged.stages[1].entry == ["hidden.1"] and staged.stages[0].exit == ["hidden.1"]
    assert_same_steps(OrtBackend.from_build(tmp_path / "whole"), staged)


def test_five_stages_generate_what_the_whole_graph_does(deep, tmp_path):
    build(deep, tmp_path / "whole", onnx_only=True)
    manifest = build(deep, tmp_path / "staged", onnx_only=True,
                     overrides={"builder": {"max_memory": one_layer_per_stage(deep)}})
    assert [s["layers"] for s in manifest["stages"]] == [[i, i + 1] for i in range(5)]
    # the export is cut, then each stage fused: together the same fused ops as the whole graph
    assert manifest["fusion"]["fused"] == json.loads((tmp_path / "whole" / "manifest.json").read_text())["fusion"]["fused"]
    # every stage reads only its own layers' cache, and passes one tensor: the residual stream
    for s in manifest["stages"]:
        first, end = s["layers"]
        assert {n.split(".")[1] for n in s["inputs"] if n.startswith("past_key_values.")} == {
            str(i) for i in range(first, end)}
        assert [n for n in s["inputs"] if n.startswith("hidden.")] == ([f"hidden.{first}"] if first else [])
    whole, staged = OrtBackend.from_build(tmp_path / "whole"), OrtBackend.from_build(tmp_path / "staged")
    assert_same_steps(whole, staged)
    assert generate(staged, PROMPTS, max_new_tokens=6).tokens == generate(whole, PROMPTS, max_new_tokens=6).tokens
    # the embedding is in the first stage only, lm_head in the last only
    weights = [set(ir.load(tmp_path / "staged" / "stages" / s["dir"] / "model.onnx").graph.initializers)
               for s in manifest["stages"]]
    assert "model.embed_tokens.weight" in weights[0] and not any("model.embed_tokens.weight" in w for w in weights[1:])
    assert "lm_head.weight" in weights[-1] and not any("lm_head.weight" in w for w in weights[:-1])


def test_budget_decides_the_stages():
    layers = LayerMap(6, {}, [100 << 20] * 6, head_bytes=300 << 20, tail_bytes=300 << 20)
    limit = lambda weights: build_peak(weights)  # noqa: E731 - the budget that holds `weights` exactly
    assert plan_stages(layers, limit(1500 << 20)).ranges == [(0, 6)]  # everything in one
    plan = plan_stages(layers, limit(500 << 20))
    assert plan.ranges == [(0, 2), (2, 5), (5, 6)]  # embedding + 2 layers, 3 layers, 1 layer + lm_head
    assert plan.weight_bytes == [500 << 20, 300 << 20, 400 << 20] and plan.peak <= limit(500 << 20)
    assert smallest_budget(layers) == limit(400 << 20)
    with pytest.raises(UsageError, match=r"smallest that works is \d\.\d\d GiB") as e:
        plan_stages(layers, limit(400 << 20) - 1)
    assert "--max-memory" in e.value.hint
    assert build_peak(1 << 30) == BUILD_BASE_BYTES + BUILD_FACTOR * (1 << 30)
    # int4 from fp32: an eighth of the bytes built fits one stage, the conversion over all of them does not
    assert plan_stages(layers, 1500 << 20, StageCost(scale=1 / 8)).ranges == [(0, 6)]
    plan = plan_stages(layers, 1500 << 20, StageCost(scale=1 / 8, conversion=lambda exported: 3 * exported))
    assert plan.ranges == [(0, 2), (2, 5), (5, 6)] and plan.peak == 1500 << 20
    assert plan.weight_bytes == [(500 << 20) // 8, (300 << 20) // 8, (400 << 20) // 8]


def test_sizes():
    assert parse_size("12G") == parse_size("12GiB") == 12 << 30
    assert parse_size("12GB") == 12 * 10**9 and parse_size("800m") == 800 << 20 and parse_size(4096) == 4096
    for bad in ("", "12X", "-1G", "0", "G", True, 1.5):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_budget_too_small_is_refused_before_work(exports, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["build", str(exports["glm4"]), "-o", str(tmp_path / "b"), "--onnx-only", "--max-memory", "100M"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "too small" in err and "smallest that works is" in err, err
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exc:
        main(["build", str(exports["glm4"]), "-o", str(tmp_path / "b"), "--onnx-only", "--max-memory", "12Q"])
    assert exc.value.code == 2 and "builder.max_memory" in capsys.readouterr().err


def test_disk_too_small_is_refused_before_writing(exports, tmp_path, monkeypatch, capsys):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(SystemExit) as exc:
        main(["build", str(exports["glm4"]), "-o", str(tmp_path / "b"), "--onnx-only"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "of disk" in err and "1000" not in err, err
    assert not list(tmp_path.iterdir())


def test_disk_for_a_staged_conversion_counts_one_stage_as_exported(monkeypatch, tmp_path):
    """int4 from fp32 in stages: the converted weights, their engines, and one fp32 stage until it is converted."""
    import shutil

    from trtglm.engine.staged_build import check_disk

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 << 30))
    check_disk(tmp_path / "b", 4 << 30, engines=True)  # 8 GiB and a margin
    with pytest.raises(UsageError, match=r"about 10\.5 GiB of disk"):
        check_disk(tmp_path / "b", 4 << 30, engines=True, transient=2 << 30)


def test_a_failed_staged_build_leaves_nothing(exports, tmp_path, monkeypatch):
    import trtglm.engine.build as b

    written = []

    def interrupted(*args, **kwargs):  # after the first stage is on disk
        if written:
            raise KeyboardInterrupt
        written.append(write(*args, **kwargs))
        return written[-1]

    write = b.write_stage
    monkeypatch.setattr(b, "write_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(exports["glm4"], tmp_path / "b", onnx_only=True,
              overrides={"builder": {"max_memory": one_layer_per_stage(exports["glm4"])}})
    assert written and not list(tmp_path.iterdir())


def test_staged_engine_build_one_engine_per_stage(exports, tmp_path, capsys):
    """TensorRT-RTX builds each stage's engine for sm89 in a process of its own; the build is verified, inspected,
    cached (a second build restores every stage) and runs its stage graphs on ONNX Runtime without a GPU."""
    args = ["build", str(exports["glm4"]), "--fp16", "--target", "sm89", "--max-memory",
            one_layer_per_stage(exports["glm4"], "fp16"),
            "--cache-dir", str(tmp_path / "cache"), "--json"]
    main([*args, "-o", str(tmp_path / "b")])
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["stage"] == "engine" and len(manifest["stages"]) == 2
    for s in manifest["stages"]:
        stage = tmp_path / "b" / "stages" / s["dir"]
        assert (stage / "model.engine").stat().st_size == s["engine"]["bytes"] > 0
        assert s["engine"]["peak_rss_bytes"] > 0 and s["engine"]["kernels"] > 0
        assert f"stages/{s['dir']}/model.engine" in manifest["files"]["sha256"]
    assert manifest["engine"]["bytes"] == sum(s["engine"]["bytes"] for s in manifest["stages"])
    main(["verify", str(tmp_path / "b")])
    assert "stages/01/model.engine" in capsys.readouterr().out
    main(["inspect", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert "stages: 2 within a budget" in out and "stage 1: layers 1-1" in out, out
    assert "cut, fusion and precision, stage by stage in the build process: peak" in out
    assert all(0 < s["graph_peak_rss_bytes"]["cut_and_fuse"] <= s["graph_peak_rss_bytes"]["convert"]
               for s in manifest["stages"])  # fp16 from fp32: both steps measured, the peak so far
    main([*args, "-o", str(tmp_path / "again")])
    again = json.loads(capsys.readouterr().out)
    assert again["cache"]["hit"] and (tmp_path / "again" / "stages" / "01" / "model.engine").is_file()
    backend, why = open_backend(tmp_path / "b")
    assert isinstance(backend, StagedBackend) and "2 stages" in why
    assert len(generate(backend, PROMPTS, max_new_tokens=3).tokens[0]) == 3
    # packs: the weights once, each with what one runtime needs, verified by their own manifests
    main(["pack", str(tmp_path / "b"), "-o", str(tmp_path / "gpu"), "--for", "gpu"])
    main(["pack", str(tmp_path / "b"), "-o", str(tmp_path / "cpu"), "--for", "cpu"])
    assert "packed for cpu" in capsys.readouterr().out
    held = {name: {str(p.relative_to(tmp_path / name)) for p in (tmp_path / name).rglob("*") if p.is_file()}
            for name in ("gpu", "cpu")}
    assert {"stages/00/model.engine", "stages/01/model.engine", "export.json"} <= held["gpu"]
    assert not any(f.endswith((".onnx", ".onnx.data")) for f in held["gpu"])
    assert {"stages/00/model.onnx.data", "stages/01/model.onnx", "export.json"} <= held["cpu"]
    assert not any(f.endswith(".engine") for f in held["cpu"])
    for name in ("gpu", "cpu"):
        main(["verify", str(tmp_path / name)])
    capsys.readouterr()
    packed, why = open_backend(tmp_path / "cpu")  # no GPU here: ONNX Runtime over the stage graphs
    assert "because the build is packed for the CPU" in why
    assert generate(packed, PROMPTS, max_new_tokens=3).tokens == generate(backend, PROMPTS, max_new_tokens=3).tokens
    with pytest.raises(TrtglmError, match="packed for GPUs .* holds the engines only"):
        open_backend(tmp_path / "gpu")
    with pytest.raises(UsageError, match="is itself packed for gpu"):
        from trtglm.engine.pack import pack

        pack(tmp_path / "gpu", tmp_path / "again-gpu", "gpu")


def test_stages_are_placed_on_devices_in_order_with_the_least_largest_load():
    from trtglm.runtime.staged import place_stages

    assert place_stages([5, 5, 5, 5], [0, 1]) == [0, 0, 1, 1]
    assert place_stages([9, 1, 1, 1, 1, 1, 1], [0, 1]) == [0, 1, 1, 1, 1, 1, 1]
    assert place_stages([3, 3, 3], [2, 5, 7]) == [2, 5, 7]
    assert place_stages([3, 3], [0, 1, 2]) == [0, 1]  # more devices than stages
    assert place_stages([4, 1, 1, 4], [0]) == [0, 0, 0, 0]
    for sizes in ([7, 2, 5, 3, 8, 1, 4], [1] * 9, [10, 1, 10, 1, 10]):  # exhaustively the best split in 3
        import itertools

        placed = place_stages(sizes, [0, 1, 2])
        loads = lambda cut: max(sum(sizes[a:b]) for a, b in zip((0, *cut), (*cut, len(sizes))))  # noqa: E731
        best = min(loads(c) for c in itertools.combinations(range(1, len(sizes)), 2))
        assert max(sum(s for s, d in zip(sizes, placed) if d == dev) for dev in (0, 1, 2)) == best
        assert placed == sorted(placed)


def _initializers(paths) -> dict:
    import onnx
    from onnx import numpy_helper

    out = {}
    for path in paths:
        for tensor in onnx.load(path).graph.initializer:
            out[tensor.name] = numpy_helper.to_array(tensor)
    return out


@pytest.mark.parametrize("dtype", ["int8", "int4", "fp16"])
def test_precision_stage_by_stage_equals_the_whole_conversion(deep, tmp_path, dtype):
    """Each stage converted on its own (int8 calibrated on the hidden states the fp32 stages before it compute):
    the same scales and weights as converting the whole graph, and the same logits op for op."""
    import glob

    precision = {"dtype": dtype, "quantization": {"block_size": 32}}  # int4 blocks of the 64-wide layers
    whole = build(deep, tmp_path / "whole", onnx_only=True, overrides={"precision": precision,
                                                                       "accuracy": {"gate": False}})
    staged = build(deep, tmp_path / "staged", onnx_only=True, overrides={
        "precision": precision, "accuracy": {"gate": False},
        "builder": {"max_memory": one_layer_per_stage(deep, dtype)}})
    assert len(staged["stages"]) == 5 and len(staged["precision"]["stages"]) == 5
    assert staged["precision"].get("quantized_nodes") == whole["precision"].get("quantized_nodes")
    a = _initializers([tmp_path / "whole" / "model.onnx"])
    b = _initializers(sorted(glob.glob(str(tmp_path / "staged" / "stages" / "*" / "model.onnx"))))
    names = [n for n in a if "scale" in n or n.endswith(("_quantized", "_q4", "weight"))]
    assert names and set(names) <= set(b)
    for name in names:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    # the logits: staged and whole differ by less than the precision itself moves them from fp32. The graphs are
    # the same node for node (a cut of the converted whole graph gives the same difference): ONNX Runtime's CPU
    # provider computes fp16 ops in fp32 and drops the fp16 round trip between two of them inside one graph,
    # but a stage's output is rounded to the fp16 it is declared as, as TensorRT rounds every fp16 tensor
    build(deep, tmp_path / "fp32", onnx_only=True)
    ids, mask, pos = left_padded(PROMPTS)
    logits = {}
    for name in ("whole", "staged", "fp32"):
        backend = OrtBackend.from_build(tmp_path / name)
        logits[name] = backend.forward(ids, mask, pos, backend.new_cache(3))[0]
    staging = np.abs(logits["staged"] - logits["whole"]).max()
    precision = np.abs(logits["whole"] - logits["fp32"]).max()
    assert staging < precision, (staging, precision)


def test_accuracy_gate_runs_on_the_chain_of_stages(deep, tmp_path):
    manifest = build(deep, tmp_path / "b", onnx_only=True, overrides={
        "precision": {"dtype": "int8"}, "accuracy": {"gate": True, "samples": 2, "seq_len": 16,
                                                    "max_ppl_delta": 1.0, "min_next_token_agreement": 0.0,
                                                    "min_logits_cosine": 0.0},
        "builder": {"max_memory": one_layer_per_stage(deep, "int8")}})
    assert len(manifest["stages"]) == 5 and manifest["accuracy"]["gate"]["passed"]
    assert manifest["accuracy"]["tokens"] == 2 * 16


def test_a_gate_past_the_budget_is_refused_before_work(deep):
    from trtglm.engine.build import _check_gate_memory
    from trtglm.engine.stage_plan import StagePlan

    fits = StagePlan([(0, 2), (2, 5)], [1 << 20, 1 << 20], budget=1 << 30, peak=1 << 29)
    _check_gate_memory(deep, fits)
    past = StagePlan([(0, 2), (2, 5)], [1 << 30, 1 << 30], budget=1 << 30, peak=1 << 29)
    with pytest.raises(UsageError, match=r"every stage in memory at once \(about 2\.0 GiB\), past the build's memory"):
        _check_gate_memory(deep, past)


def test_a_terminated_staged_build_leaves_nothing(deep, tmp_path):
    """SIGTERM (a cancelled CI job) stops a build as Ctrl-C does: exit 143, one line, the output removed."""
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "one stage written"
    script = f"""
import time
import trtglm.engine.build as b
from trtglm.cli import main
write = b.write_stage
def slow(*args, **kwargs):
    out = write(*args, **kwargs)
    open({str(marker)!r}, "w").close()
    time.sleep(60)
    return out
b.write_stage = slow
main(["build", {str(deep)!r}, "-o", {str(tmp_path / "out" / "b")!r}, "--onnx-only", "--max-memory",
      {one_layer_per_stage(deep)!r}])
"""
    (tmp_path / "out").mkdir()
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), child.stderr.read() if child.poll() is not None else "no stage was written"
    child.send_signal(signal.SIGTERM)
    err = child.communicate(timeout=60)[1]
    assert child.returncode == 143 and err.strip().splitlines()[-1] == "trtglm: terminated", err
    assert not list((tmp_path / "out").iterdir())
