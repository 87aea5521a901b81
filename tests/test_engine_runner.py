"""The TensorRT engine runner (trtglm/runtime/trt.py) end to end without a GPU: real engine builds (TensorRT-RTX on
the CPU), run by the real `TrtBackend` through a simulated TensorRT runtime and pycuda (tests/simgpu), token for
token against the ONNX Runtime backend over the same build."""

import json
import shutil

import pytest
from simgpu import cuda, install, tensorrt

from trtglm.core.errors import TrtglmError, UsageError
from trtglm.engine.build import build
from trtglm.runtime.backends import OrtBackend, open_backend
from trtglm.runtime.generate import generate, make_prefix

PROMPTS = [[5, 17, 99, 3, 42, 8, 150], [11, 12], [77, 1, 60, 61]]
CONFIGS = [("dynamic", "single"), ("dynamic", "split"), ("static", "single"), ("static", "split")]


@pytest.fixture(scope="module")
def builds(checkpoints, tmp_path_factory):
    """(kv_cache, profiles) -> an fp16 engine build of the tiny glm4 model (max batch 3, input 16, sequence 64)."""
    from trtglm.export.exporter import export

    root = tmp_path_factory.mktemp("runner")
    export(str(checkpoints["glm4"]), root / "e", dtype="fp16", validate=False, max_seq_len=64)
    out = {}
    for kv_cache, profiles in CONFIGS:
        out[kv_cache, profiles] = root / f"{kv_cache}-{profiles}"
        build(root / "e", out[kv_cache, profiles], use_cache=False, overrides={"shapes": {
            "max_batch": 3, "max_input_len": 16, "max_seq_len": 64, "kv_cache": kv_cache, "profiles": profiles}})
    return out


def built_by(build_dir, module: str, tmp_path):
    """`build_dir` as if the full TensorRT had built it (the manifest names the module; the engine is the same)."""
    if module == "tensorrt_rtx":
        return build_dir
    copy = tmp_path / "full-tensorrt"
    shutil.copytree(build_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["backend"]["name"] = module
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.fixture
def cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize("module", ["tensorrt_rtx", "tensorrt"])
@pytest.mark.parametrize("config", CONFIGS, ids=["-".join(c) for c in CONFIGS])
def test_engine_runner_generates_like_onnx_runtime(builds, config, module, monkeypatch, tmp_path, cache_home):
    build_dir = built_by(builds[config], module, tmp_path)
    trt = install(monkeypatch, build_dir, module)
    engine, why = open_backend(build_dir, "trt")
    assert why == "TensorRT engine" and engine.name == "trt"
    assert trt.DESERIALIZED == [build_dir]  # once, by the module the manifest names (verify does not load it again)
    ort = OrtBackend.from_build(build_dir)
    for prompts in ([PROMPTS[0]], PROMPTS):  # batch 1, and a left-padded batch of 3
        assert generate(engine, prompts, max_new_tokens=10).tokens == generate(ort, prompts, max_new_tokens=10).tokens
    steps = engine.context.steps  # the optimization profile each step ran under
    assert set(steps) == ({0, 1} if config[1] == "split" else {0})
    if config[1] == "split":
        assert all(p == 1 for p in steps if p) and steps.count(0) == 2  # the two prefills on 0, every decode on 1

    reference = generate(ort, PROMPTS, max_new_tokens=10).tokens
    stop = reference[0][3]
    streamed = []
    got = generate(engine, PROMPTS, max_new_tokens=10, stop_ids={stop}, on_token=lambda r, t: streamed.append((r, t)))
    assert got.tokens == generate(ort, PROMPTS, max_new_tokens=10, stop_ids={stop}).tokens
    assert got.tokens[0][-1] == stop and got.finish[0] == "stop"
    assert [t for r, t in streamed if r == 0] == got.tokens[0]

    prefix = [3, 1, 4, 1, 5]
    if config == ("dynamic", "split"):  # its prefill profile has no past: said before any work
        kept = make_prefix(engine, prefix)  # a prefix alone is an ordinary prefill
        with pytest.raises(TrtglmError, match="no optimization profile .* after 5 cached.*profiles: single"):
            generate(engine, PROMPTS, max_new_tokens=4, prefix=kept)
    else:
        kept = make_prefix(engine, prefix)
        generate(engine, [[2, 7]], max_new_tokens=5)  # the working buffers are written over: the prefix is a copy
        got = generate(engine, PROMPTS, max_new_tokens=6, prefix=kept).tokens
        assert got == generate(ort, [prefix + p for p in PROMPTS], max_new_tokens=6).tokens
    engine.close()
    assert not cuda.DEVICE.streams[engine.stream.handle].queue


@pytest.mark.parametrize("config", [c for c in CONFIGS if c[0] == "static"], ids=["single", "split"])
def test_cuda_graphs_replay_decode_steps_with_the_same_tokens(builds, config, monkeypatch, cache_home):
    install(monkeypatch, builds[config])
    engine, why = open_backend(builds[config], "trt", cuda_graphs=True)
    assert why == "TensorRT engine, CUDA graphs"
    ort = OrtBackend.from_build(builds[config])
    assert generate(engine, PROMPTS, max_new_tokens=10).tokens == generate(ort, PROMPTS, max_new_tokens=10).tokens
    assert max(engine.context.captured.values()) >= 8  # every decode step has the shapes of the first one
    engine.close()


def test_cuda_graphs_need_tensorrt_rtx_and_a_static_cache(builds, monkeypatch, tmp_path, cache_home):
    full = built_by(builds["static", "single"], "tensorrt", tmp_path)
    install(monkeypatch, full, "tensorrt")
    with pytest.raises(TrtglmError, match="--cuda-graphs: tensorrt .* has no built-in CUDA graph capture"):
        open_backend(full, "trt", cuda_graphs=True)
    install(monkeypatch, builds["dynamic", "single"])
    with pytest.raises(UsageError, match="needs a build with a static KV cache"):
        open_backend(builds["dynamic", "single"], "trt", cuda_graphs=True)


@pytest.mark.parametrize("prompts,message", [
    ([[1, 2]] * 4, "4 rows exceed the engine's max_batch 3"),
    ([list(range(1, 18))], "17 new tokens exceed the engine's max_input_len 16"),
], ids=["batch", "input_len"])
def test_requests_past_the_engines_limits_are_refused_before_any_copy(builds, prompts, message, monkeypatch,
                                                                      cache_home):
    install(monkeypatch, builds["static", "single"])
    engine, _ = open_backend(builds["static", "single"], "trt")
    with pytest.raises(TrtglmError, match=message):
        generate(engine, prompts, max_new_tokens=4)
    with pytest.raises(TrtglmError, match=message):  # a caller that steps the engine itself
        engine.forward(*_step(prompts), engine.new_cache(len(prompts)))
    assert engine.context.steps == [] and not engine.stream.queue  # nothing reached the device


def _step(prompts):
    import numpy as np

    n = len(prompts[0])
    return np.array(prompts), np.ones((len(prompts), n), np.int64), np.tile(np.arange(n), (len(prompts), 1))


def test_engine_io_is_checked_against_the_manifest(builds, monkeypatch, tmp_path, cache_home):
    original = builds["dynamic", "single"]
    install(monkeypatch, original)  # the simulated engine is the original build's
    copy = tmp_path / "b"
    shutil.copytree(original, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["io"]["outputs"][0]["dtype"] = "float16"  # logits
    manifest["io"]["inputs"] = [s for s in manifest["io"]["inputs"] if s["name"] != "position_ids"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrtglmError, match=r"does not match its manifest: logits: the manifest says output float16, "
                                          r"the engine output float32; position_ids is in the engine, not in the "
                                          r"manifest"):
        open_backend(copy, "trt")


def test_close_releases_the_context_before_its_runtime_cache(builds, monkeypatch, cache_home, tmp_path):
    install(monkeypatch, builds["static", "single"])
    engine, _ = open_backend(builds["static", "single"], "trt")
    generate(engine, PROMPTS[:1], max_new_tokens=3)
    tensorrt.EVENTS.clear()
    engine.close()
    assert tensorrt.EVENTS[:2] == ["context", "runtime cache"]
    assert list((tmp_path / "cache" / "trtglm" / "runtime").glob("*.bin"))  # kept for the next session
    engine.close()  # twice is harmless


def test_the_simulation_is_strict(builds, monkeypatch, cache_home):
    """What the simulated runtime refuses, so the runner's tests mean something."""
    import numpy as np

    install(monkeypatch, builds["dynamic", "split"])
    engine, _ = open_backend(builds["dynamic", "split"], "trt")
    with pytest.raises(cuda.SimulatedCudaError, match="no CUDA context is current"):
        cuda.mem_alloc(8)  # the runner makes its device's context current around everything it does
    with engine._on_device():
        context = engine.context
        assert not context.set_input_shape("input_ids", (4, 3))  # past the profile's max batch
        assert not context.set_input_shape("past_key_values.0.key", (1, 2, 5, 16))  # profile 0: no past
        assert context.set_optimization_profile_async(1, engine.stream.handle)
        assert not context.set_input_shape("input_ids", (1, 2))  # profile 1: one new token
        assert not context.execute_async_v3(engine.stream.handle)  # inputs without shapes
        assert any("has no shape" in e for e in context.errors)
        small = cuda.mem_alloc(8)
        with pytest.raises(cuda.SimulatedCudaError, match="overruns"):
            cuda.memcpy_htod_async(small, np.zeros(4, np.int64), engine.stream)
        with pytest.raises(cuda.SimulatedCudaError, match="in no allocation"):
            cuda.DEVICE.view(int(small) + 4096, 1)
        host = np.zeros(1, np.int64)
        cuda.memcpy_dtoh_async(host, small, engine.stream)
        cuda.memset_d8(small, 1, 8)
        assert host[0] == 0  # not yet: the copy runs at synchronize
        engine.stream.synchronize()
        assert host[0] == 0x0101010101010101
        with pytest.raises(cuda.SimulatedCudaError, match="in no allocation of GPU 1"):
            cuda.GPUS[1].view(int(small), 1)  # one GPU cannot read another's memory
    other = cuda.Device(1).retain_primary_context()
    other.push()
    try:
        with pytest.raises(cuda.SimulatedCudaError, match="invalid resource handle"):
            cuda.memcpy_dtoh_async(host, small, engine.stream)  # a stream of GPU 0 while GPU 1 is current
    finally:
        cuda.Context.pop()
    engine.close()


def test_a_static_cache_needs_a_tensorrt_with_the_kv_cache_update_layer():
    import types

    from trtglm.engine.tensorrt import check_features

    old, new = (types.SimpleNamespace(__name__="tensorrt", __version__=v) for v in ("10.13.2.6", "10.15.1"))
    with pytest.raises(TrtglmError, match="static KV cache needs .* tensorrt 10.15 and newer; this is 10.13.2.6"):
        check_features(old, "static")
    check_features(old, "dynamic")
    check_features(new, "static")
    check_features(types.SimpleNamespace(__name__="tensorrt_rtx", __version__="1.4.0"), "static")


def test_compare_backends_through_the_simulation(builds, monkeypatch, cache_home):
    """The GPU check's measure (runtime/compare.py), here on the simulated engine: same graph, same numbers."""
    from trtglm.runtime.compare import compare_backends

    install(monkeypatch, builds["static", "split"])
    engine, _ = open_backend(builds["static", "split"], "trt")
    result = compare_backends(engine, OrtBackend.from_build(builds["static", "split"]), PROMPTS, new_tokens=6)
    assert result.steps == 3 * 6 and result.decided > 0 and result.passed(2e-2), result
    engine.close()


@pytest.fixture(scope="module")
def staged(builds, tmp_path_factory):
    """kv_cache -> an fp16 engine build of the same export in 2 stages (one layer each), split profiles."""
    from models import one_layer_per_stage

    export_dir = builds["dynamic", "single"].parent / "e"
    budget = one_layer_per_stage(export_dir)
    root = tmp_path_factory.mktemp("staged")
    for kv_cache in ("dynamic", "static"):
        build(export_dir, root / kv_cache, use_cache=False, overrides={
            "shapes": {"max_batch": 3, "max_input_len": 16, "max_seq_len": 64, "kv_cache": kv_cache,
                       "profiles": "split" if kv_cache == "static" else "single"},
            "builder": {"max_memory": budget}})
    return {kv_cache: root / kv_cache for kv_cache in ("dynamic", "static")}


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_staged_engines_chain_like_onnx_runtime(builds, staged, kv_cache, monkeypatch, cache_home):
    """The runner chains a staged build's engines: the first stage's hidden states stay on the device and the
    second stage reads them where they are; tokens equal ONNX Runtime's over the same stage graphs, and over the
    whole graph's build."""
    from trtglm.runtime.staged import StagedBackend

    build_dir = staged[kv_cache]
    trt = install(monkeypatch, build_dir)
    engine, why = open_backend(build_dir, "trt")
    assert why == "TensorRT engine (2 stages)" and isinstance(engine, StagedBackend)
    assert trt.DESERIALIZED == [build_dir / "stages" / "00", build_dir / "stages" / "01"]
    first, second = engine.stages
    assert first.entry == ["input_ids"] and first.exit == ["hidden.1"] and first.vocab_size is None
    assert second.entry == ["hidden.1"] and "hidden.1" not in second._dev  # no buffer of its own: it reads first's
    ort = OrtBackend.from_build(build_dir)
    whole = OrtBackend.from_build(builds[kv_cache, "split" if kv_cache == "static" else "single"])
    got = generate(engine, PROMPTS, max_new_tokens=10).tokens
    assert got == generate(ort, PROMPTS, max_new_tokens=10).tokens == generate(whole, PROMPTS, max_new_tokens=10).tokens
    assert second.context.addresses["hidden.1"] == int(first._dev["hidden.1"])
    kept = make_prefix(engine, [3, 1, 4, 1, 5]) if kv_cache == "static" else None
    if kept is not None:
        assert generate(engine, PROMPTS, max_new_tokens=6, prefix=kept).tokens == generate(
            ort, [[3, 1, 4, 1, 5] + p for p in PROMPTS], max_new_tokens=6).tokens
    with pytest.raises(TrtglmError, match="4 rows exceed the engine's max_batch 3"):
        generate(engine, [[1, 2]] * 4, max_new_tokens=2)
    engine.close()


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_stages_on_two_devices(staged, kv_cache, monkeypatch, cache_home):
    """--devices 0,1: each stage's engine, buffers and stream on its own (simulated) GPU, which cannot read the
    other's memory; the hidden states are copied from GPU 0 to GPU 1 at every step, and the tokens are ONNX
    Runtime's over the same stage graphs."""
    build_dir = staged[kv_cache]
    install(monkeypatch, build_dir)
    cuda.PEER_COPIES.clear()
    engine, why = open_backend(build_dir, "trt", devices=[0, 1])
    assert why == "TensorRT engine (2 stages on devices 0,1)"
    first, second = engine.stages
    assert (first.engine.gpu.index, second.engine.gpu.index) == (0, 1)
    assert first.stream.gpu.index == 0 and second.stream.gpu.index == 1
    assert {a.gpu.index for a in second._dev.values()} == {1} and "hidden.1" in second._dev
    got = generate(engine, PROMPTS, max_new_tokens=8).tokens
    assert got == generate(OrtBackend.from_build(build_dir), PROMPTS, max_new_tokens=8).tokens
    steps = len(second.context.steps)
    assert steps >= 8 and [(a, b) for a, b, _ in cuda.PEER_COPIES] == [(0, 1)] * steps
    engine.close()


def test_devices_are_checked(builds, staged, monkeypatch, cache_home):
    install(monkeypatch, staged["dynamic"])
    with pytest.raises(UsageError, match=r"no CUDA device 2 here \(devices here: 0-1\)"):
        open_backend(staged["dynamic"], "trt", devices=[0, 2])
    with pytest.raises(UsageError, match="names a device twice"):
        open_backend(staged["dynamic"], "trt", devices=[1, 1])
    with pytest.raises(UsageError, match="--backend ort runs ONNX Runtime on one device"):
        open_backend(staged["dynamic"], "ort", devices=[0, 1])
    whole = builds["dynamic", "single"]
    install(monkeypatch, whole)
    with pytest.raises(UsageError, match="this build is one engine, which runs on one device"):
        open_backend(whole, "trt", devices=[0, 1])
    engine, _ = open_backend(whole, "trt", devices=[1])  # one engine on the second GPU
    assert engine.engine.gpu.index == 1 and len(generate(engine, PROMPTS, max_new_tokens=2).tokens[0]) == 2
    engine.close()


def test_a_gpu_pack_runs_on_its_engines_alone(staged, tmp_path, monkeypatch, cache_home):
    """`trtglm pack --for gpu` keeps the engines and drops the ONNX weights; the runner needs nothing else."""
    from trtglm.engine.pack import pack

    pack(staged["dynamic"], tmp_path / "gpu", "gpu")
    assert not list((tmp_path / "gpu").rglob("*.onnx.data"))
    install(monkeypatch, staged["dynamic"])  # the simulated runtime computes an engine with its build's graph
    engine, why = open_backend(tmp_path / "gpu", "trt")
    assert why == "TensorRT engine (2 stages)"
    got = generate(engine, PROMPTS, max_new_tokens=6).tokens
    assert got == generate(OrtBackend.from_build(staged["dynamic"]), PROMPTS, max_new_tokens=6).tokens
    engine.close()


@pytest.mark.parametrize("config", CONFIGS + [("staged", "dynamic"), ("staged", "static")],
                         ids=["-".join(c) for c in CONFIGS] + ["staged-dynamic", "staged-static"])
def test_continuous_batching_on_the_engine_reads_and_writes_its_cache(builds, staged, config, monkeypatch,
                                                                      cache_home):
    """Rows joining and leaving a running batch (the server's loop) move the engine's cache through the host:
    tokens equal each prompt generated alone on ONNX Runtime, with the engine's batch limit of 3 rows."""
    from test_batching import staggered

    build_dir = staged[config[1]] if config[0] == "staged" else builds[config]
    install(monkeypatch, build_dir)
    engine, _ = open_backend(build_dir, "trt")
    ort = OrtBackend.from_build(build_dir)
    prompts = [PROMPTS[0], PROMPTS[1], [9, 8, 7, 6, 5, 4, 3, 2, 1], PROMPTS[2], [4] * 16]
    new = [10, 3, 14, 1, 6]
    alone = [generate(ort, [p], max_new_tokens=n).tokens[0] for p, n in zip(prompts, new)]
    assert staggered(engine, prompts, new, max_batch=3) == alone
    with pytest.raises(TrtglmError, match="4 rows exceed the engine's max_batch 3"):
        engine.write_cache([a.repeat(4, axis=0) for a in engine.read_cache(engine.new_cache(1))])
    engine.close()
