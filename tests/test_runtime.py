"""The generation loop over the ONNX Runtime backend against transformers' generate, and the TensorRT
backend's logic that needs no GPU."""

import numpy as np
import pytest
import torch

from trtglm.core.errors import TrtglmError, UsageError
from trtglm.engine.build import build
from trtglm.runtime.backends import OrtBackend, open_backend
from trtglm.runtime.generate import generate, make_prefix
from trtglm.runtime.sampling import Sampling, choose

FAMILIES = ["glm", "glm4", "chatglm"]


@pytest.fixture(scope="module")
def builds(exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    return {f: build(exports[f], root / f, onnx_only=True) and root / f for f in FAMILIES}


def hf_greedy(model, prompts, new_tokens):
    """transformers generate, greedy, left padding, no stop token."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens)
    return out[:, longest:].tolist()


PROMPTS = [[5, 17, 99, 3, 42, 8, 150], [11, 12], [77, 1, 60, 61]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_equals_transformers_generate(family, batch, models, builds):
    prompts = PROMPTS[:batch]
    ours = generate(OrtBackend.from_build(builds[family]), prompts, max_new_tokens=12).tokens
    assert ours == hf_greedy(models[family], prompts, 12)


def test_seeded_sampling_is_reproducible(builds):
    backend = OrtBackend.from_build(builds["glm4"])
    s = Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=1234)
    a = generate(backend, PROMPTS, max_new_tokens=10, sampling=s).tokens
    b = generate(backend, PROMPTS, max_new_tokens=10, sampling=s).tokens
    c = generate(backend, PROMPTS, max_new_tokens=10, sampling=Sampling(temperature=1.0, seed=99)).tokens
    assert a == b and a != c


def test_stop_tokens_end_generation(builds):
    backend = OrtBackend.from_build(builds["glm"])
    free = generate(backend, PROMPTS[:1], max_new_tokens=8).tokens[0]
    stop = free[3]
    first = free.index(stop)
    out = generate(backend, PROMPTS[:1], max_new_tokens=8, stop_ids={stop})
    assert out.tokens[0] == free[:first + 1] and out.finish == ["stop"]
    assert generate(backend, PROMPTS[:1], max_new_tokens=8).finish == ["length"]


def test_stop_in_one_row_does_not_end_the_others(builds):
    backend = OrtBackend.from_build(builds["glm"])
    free = generate(backend, PROMPTS, max_new_tokens=6).tokens
    stop = free[1][0]  # row 1 stops at once
    out = generate(backend, PROMPTS, max_new_tokens=6, stop_ids={stop})
    assert out.tokens[1] == [stop] and out.finish[1] == "stop"
    for row in (0, 2):
        expect = free[row][:free[row].index(stop) + 1] if stop in free[row] else free[row]
        assert out.tokens[row] == expect


def test_prefix_reuse_equals_recomputation(builds):
    backend = OrtBackend.from_build(builds["glm4"])
    system = [9, 8, 7, 6, 5, 4, 3]
    suffixes = [[100, 101], [102, 103, 104, 105], [106]]
    full = generate(backend, [system + s for s in suffixes], max_new_tokens=10).tokens
    prefix = make_prefix(backend, system)
    reused = generate(backend, suffixes, max_new_tokens=10, prefix=prefix).tokens
    again = generate(backend, suffixes, max_new_tokens=10, prefix=prefix).tokens
    assert reused == full and again == full


def test_max_seq_len_is_respected(builds):
    backend = OrtBackend.from_build(builds["glm"])
    backend.max_seq_len = 12
    out = generate(backend, [[1, 2, 3, 4, 5, 6, 7, 8]], max_new_tokens=50)
    assert len(out.tokens[0]) == 4 and out.finish == ["length"]
    with pytest.raises(TrtglmError, match="leaves no room in the engine's max_seq_len 12"):
        generate(backend, [list(range(1, 13))], max_new_tokens=5)


def test_step_memory_estimate_covers_what_a_large_batch_takes(builds):
    """admits() refuses by step_bytes: a batch it lets through must not take more than it says (or an absurd batch
    that passes the check is killed for memory instead of refused). Measured in a process of its own."""
    import subprocess
    import sys

    script = f"""
import numpy as np
from trtglm.runtime.backends import OrtBackend
from trtglm.runtime.generate import generate
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
backend = OrtBackend.from_build({str(builds["glm4"])!r})
generate(backend, [[5, 6, 7, 8]], max_new_tokens=2)
open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
before = status("VmRSS:")
generate(backend, np.full((20000, 24), 7).tolist(), max_new_tokens=2)
print(status("VmHWM:") - before, backend.step_bytes(20000, 24, 0))
"""
    grew, estimate = map(int, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                             check=True).stdout.split())
    assert grew > 100 << 20, (grew, estimate)  # the batch is large enough to measure
    assert estimate >= grew, (estimate, grew)


def test_streaming_callback_sees_every_token_in_order(builds):
    seen = []
    out = generate(OrtBackend.from_build(builds["glm"]), PROMPTS, max_new_tokens=5, on_token=lambda r, t: seen.append((r, t)))
    for row in range(3):
        assert [t for r, t in seen if r == row] == out.tokens[row]


def test_sampling_rules():
    rng = np.random.default_rng(0)
    logits = np.array([[0.0, 3.0, 2.9, -1.0]], np.float32)
    assert choose(logits, [np.array([])], Sampling(), rng).tolist() == [1]
    assert choose(logits, [np.array([])], Sampling(temperature=5.0, top_k=1, seed=1), rng).tolist() == [1]
    assert choose(logits, [np.array([])], Sampling(temperature=5.0, top_p=0.01), rng).tolist() == [1]
    assert choose(logits, [np.array([1])], Sampling(repetition_penalty=1.5), rng).tolist() == [2]  # 3/1.5 < 2.9
    draws = [choose(logits, [np.array([])], Sampling(temperature=1.0, top_k=2), rng)[0] for _ in range(200)]
    assert set(draws) == {1, 2}
    with pytest.raises(ValueError):
        Sampling(top_p=0.0)


def test_auto_backend_says_why_it_fell_back(builds):
    backend, why = open_backend(builds["glm"], "auto")
    assert backend.name == "ort" and "because the build has no engine" in why
    with pytest.raises(TrtglmError, match="--backend trt: the build has no engine"):
        open_backend(builds["glm"], "trt")


def cuda_provider_usable() -> bool:
    import onnxruntime as ort

    from trtglm.runtime.backends import _cuda_usable

    return _cuda_usable(ort)


def skip_without_cuda_provider() -> None:
    if not cuda_provider_usable():
        pytest.skip("ONNX Runtime has no usable CUDA provider here (needs onnxruntime-gpu and a GPU)")


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cuda_provider_keeps_the_cache_on_the_gpu_and_generates_like_the_cpu(exports, cache, tmp_path):
    """onnxruntime-gpu: KV caches in CUDA memory (a static one written in place, step after step) and the
    CPU provider's greedy tokens (fp32 graph, TF32 off)."""
    from models import left_padded

    skip_without_cuda_provider()
    build(exports["glm4"], tmp_path / "b", onnx_only=True, overrides={"shapes": {"kv_cache": cache}})
    gpu, cpu = OrtBackend.from_build(tmp_path / "b"), OrtBackend.from_build(tmp_path / "b", device="cpu")
    assert gpu.device == "cuda"
    first = gpu.new_cache(3)
    values = first.values if gpu.static else first
    assert {v.device_name().lower() for v in values} == {"cuda"}
    _, after = gpu.forward(*left_padded(PROMPTS), first)
    after = after.values if gpu.static else after
    assert {v.device_name().lower() for v in after} == {"cuda"}
    if gpu.static:  # the same device buffers, written in place
        assert [v.data_ptr() for v in after] == [v.data_ptr() for v in values]
    assert generate(gpu, PROMPTS, max_new_tokens=12).tokens == generate(cpu, PROMPTS, max_new_tokens=12).tokens


@pytest.mark.gpu
def test_cuda_graph_replays_generate_what_plain_steps_do(exports, tmp_path):
    """ONNX Runtime's CUDA graphs: each batch size's decode step captured once and replayed with new inputs, a
    new cache and a prefix's cache, with the tokens of uncaptured steps."""
    skip_without_cuda_provider()
    build(exports["glm4"], tmp_path / "b", onnx_only=True, overrides={"shapes": {"kv_cache": "static"}})
    graphs = OrtBackend.from_build(tmp_path / "b", cuda_graphs=True)
    plain = OrtBackend.from_build(tmp_path / "b")
    for prompts in (PROMPTS, PROMPTS[1:], [[9, 8, 7, 6]], PROMPTS[::-1]):  # batch 3 captured, then replayed
        assert generate(graphs, prompts, max_new_tokens=10).tokens == generate(plain, prompts, max_new_tokens=10).tokens
    prefix = [3, 1, 4, 1, 5]
    kept = make_prefix(graphs, prefix)
    generate(graphs, [[2, 7]], max_new_tokens=5)  # the batch-1 buffers are written over: the prefix is its own copy
    got = generate(graphs, PROMPTS, max_new_tokens=8, prefix=kept).tokens
    assert got == generate(plain, [prefix + p for p in PROMPTS], max_new_tokens=8).tokens


# ---------------------------------------------------------------- TensorRT backend, without a GPU

@pytest.fixture(scope="module", params=["static", "dynamic"])
def engine_build(request, checkpoints, tmp_path_factory):
    from trtglm.export.exporter import export

    root = tmp_path_factory.mktemp("trt")
    export(str(checkpoints["glm4"]), root / "e", dtype="fp16", validate=False, max_seq_len=64)
    build(root / "e", root / "b", use_cache=False, overrides={
        "shapes": {"max_batch": 2, "max_input_len": 16, "max_seq_len": 64, "kv_cache": request.param}})
    return root / "b"


def test_buffer_plan_covers_the_largest_shapes(engine_build):
    from trtglm.engine.directory import BuildDir
    from trtglm.runtime.trt import plan_buffers

    manifest = BuildDir(engine_build).manifest
    plan = plan_buffers(manifest)
    assert plan["input_ids"].max_shape == (2, 16) and plan["logits"].max_shape == (2, 1, 160)  # the last position
    assert plan["logits"].dtype == "float32"
    if manifest["recipe"]["resolved"]["shapes"]["kv_cache"] == "dynamic":  # past + new tokens, at most 63 + 16
        assert plan["attention_mask"].max_shape == (2, 16 + 63)
        assert plan["past_key_values.0.key"].max_shape == (2, 2, 63, 16)
        assert plan["present.1.value"].max_shape == (2, 2, 79, 16)
        assert plan["present.1.value"].nbytes == 2 * 2 * 79 * 16 * 2
    else:  # 64 slots, written in place
        assert plan["attention_mask"].max_shape == (2, 64) and plan["cache_position"].max_shape == (2,)
        assert plan["past_key_values.0.key"].max_shape == plan["present.1.value"].max_shape == (2, 2, 64, 16)


def test_engine_availability_reasons(engine_build):
    from trtglm.runtime.trt import unavailable_reason

    assert unavailable_reason(engine_build, cc=None) == "there is no GPU"
    assert unavailable_reason(engine_build, cc="sm86") == "this GPU is sm86 and the engine was built for sm89"
    assert unavailable_reason(engine_build, cc="sm90").startswith("this GPU is sm90, which TensorRT-RTX cannot run")
    assert unavailable_reason(engine_build, cc="sm89") in (None, "pycuda is not installed (pip install 'trtglm[cuda]')")


def test_corrupt_engine_is_refused_before_tensorrt_sees_it(engine_build, tmp_path):
    import shutil

    from trtglm.engine.inspect import VerifyFailed, verify

    copy = tmp_path / "b"
    shutil.copytree(engine_build, copy)
    (copy / "model.engine").write_bytes(b"garbage")
    with pytest.raises(VerifyFailed, match="model.engine does not match its sha256"):
        verify(copy)


def test_cuda_graphs_are_tensorrt_rtxs_and_its_runtime_cache_is_per_engine(engine_build, monkeypatch, tmp_path):
    import types

    import tensorrt_rtx

    from trtglm.engine.directory import BuildDir
    from trtglm.runtime.trt import cuda_graph_refusal, runtime_cache_file

    assert cuda_graph_refusal(tensorrt_rtx) is None  # IRuntimeConfig.cuda_graph_strategy = WHOLE_GRAPH_CAPTURE
    full = types.SimpleNamespace(__name__="tensorrt", __version__="10.13.0")  # no CudaGraphStrategy
    assert cuda_graph_refusal(full) == ("tensorrt 10.13.0 has no built-in CUDA graph capture (IRuntimeConfig's "
                                        "cuda_graph_strategy is TensorRT-RTX's)")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    manifest = BuildDir(engine_build).manifest
    f = runtime_cache_file(manifest)
    assert f.parent == tmp_path / "trtglm" / "runtime" and manifest["files"]["sha256"]["model.engine"].startswith(f.stem)
    if manifest["recipe"]["resolved"]["shapes"]["kv_cache"] == "static":  # what a captured decode step needs
        with pytest.raises(TrtglmError, match=r"needs its CUDA provider .*here it runs on the CPU \(and the "
                                              r"TensorRT engine cannot run here: there is no GPU\)"):
            open_backend(engine_build, "auto", cuda_graphs=True)
    else:
        with pytest.raises(UsageError, match="--cuda-graphs needs a build with a static KV cache"):
            open_backend(engine_build, "auto", cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache,cuda_graphs", [("dynamic", False), ("static", False), ("static", True)])
def test_engine_on_this_gpu_matches_onnx_runtime(checkpoints, kv_cache, cuda_graphs, monkeypatch, tmp_path):
    """On a GPU: an fp16 engine built for this GPU's compute capability, against ONNX Runtime over the same build:
    logits within 2% of their scale at every step, greedy tokens equal wherever the reference is no near tie."""
    from trtglm.engine.tensorrt import gpu_compute_capability
    from trtglm.export.exporter import export
    from trtglm.runtime.compare import compare_backends
    from trtglm.runtime.trt import TrtBackend, unavailable_reason

    cc = gpu_compute_capability()
    if cc is None:
        pytest.skip("TensorRT engine cannot run here: there is no GPU")
    export(str(checkpoints["glm4"]), tmp_path / "e", dtype="fp16", validate=False, max_seq_len=64)
    try:
        build(tmp_path / "e", tmp_path / "b", use_cache=False, overrides={
            "builder": {"targets": (cc,)}, "shapes": {"max_batch": 3, "max_input_len": 16, "max_seq_len": 64,
                                                      "kv_cache": kv_cache}})
    except TrtglmError as e:
        pytest.skip(f"TensorRT engine cannot run here: no engine for {cc} ({e})")
    reason = unavailable_reason(tmp_path / "b")
    if reason:
        pytest.skip(f"TensorRT engine cannot run here: {reason}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    engine = TrtBackend(tmp_path / "b", cuda_graphs=cuda_graphs)
    result = compare_backends(engine, OrtBackend.from_build(tmp_path / "b", device="cpu"), PROMPTS, new_tokens=8)
    engine.close()
    assert result.passed(2e-2), result


# ---------------------------------------------------------------- trtglm run / bench

@pytest.fixture(scope="module")
def text_build(checkpoints, tmp_path_factory):
    import shutil

    from models import add_tokenizer
    from trtglm.export.exporter import export

    root = tmp_path_factory.mktemp("text")
    shutil.copytree(checkpoints["glm4"], root / "ckpt")
    add_tokenizer(root / "ckpt")
    export(str(root / "ckpt"), root / "e", validate=False)
    build(root / "e", root / "b", onnx_only=True)
    return root / "b"


def cli(*args, stdin=None):
    import subprocess
    import sys

    # Bytes, decoded here: text=True would turn a generated "\r" into "\n" (universal newlines).
    r = subprocess.run([sys.executable, "-m", "trtglm", *args], capture_output=True,
                       input=None if stdin is None else stdin.encode())
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def test_run_prompts_json_and_stream(text_build):
    import json

    from trtglm.model.tokenizer import load_text

    r = cli("run", str(text_build), "--prompt", "the quick", "--prompt", "hello", "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    device = OrtBackend.from_build(text_build).device  # cpu, or cuda where onnxruntime-gpu finds a GPU
    assert f"backend: ONNX Runtime ({device}) over model.onnx, because the build has no engine" in r.stderr
    out = json.loads(r.stdout)
    text = load_text(text_build)
    ids = [text.encode(p) for p in ("the quick", "hello")]
    expect = generate(OrtBackend.from_build(text_build), ids, max_new_tokens=6, stop_ids=text.stop_ids, pad_id=text.pad_id)
    assert [row["tokens"] for row in out["rows"]] == expect.tokens
    assert out["rows"][0]["completion"] == text.decode(expect.tokens[0])
    streamed = cli("run", str(text_build), "--prompt", "the quick", "--max-new-tokens", "6", "--stream")
    assert streamed.returncode == 0 and streamed.stdout.strip() == out["rows"][0]["completion"].strip()


def test_run_chat_uses_the_template(text_build):
    from trtglm.model.tokenizer import load_text

    text = load_text(text_build)
    ids = text.chat([{"role": "user", "content": "hello"}])
    assert ids[0] == text.tokenizer.convert_tokens_to_ids("<|user|>")
    assert ids[-1] == text.tokenizer.convert_tokens_to_ids("<|assistant|>")
    r = cli("run", str(text_build), "--chat", "--max-new-tokens", "4", stdin="hello\nthe dog\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") >= 2


def test_run_prefix_equals_full_prompts(text_build):
    """--prefix: its tokens, computed once, then each prompt's tokens; the same as feeding them all each time."""
    import json

    from trtglm.model.tokenizer import load_text

    a = cli("run", str(text_build), "--prefix", "the lazy dog ", "--prompt", "jumps", "--prompt", "hello world",
            "--max-new-tokens", "5", "--json")
    assert a.returncode == 0, a.stderr
    text = load_text(text_build)
    full = [text.encode("the lazy dog ") + text.encode(p) for p in ("jumps", "hello world")]
    expect = generate(OrtBackend.from_build(text_build), full, max_new_tokens=5, stop_ids=text.stop_ids, pad_id=text.pad_id)
    assert [r["tokens"] for r in json.loads(a.stdout)["rows"]] == expect.tokens


def test_cuda_graphs_on_onnx_runtime_need_its_cuda_provider(text_build, tmp_path):
    build(text_build.parent / "e", tmp_path / "static", onnx_only=True, overrides={"shapes": {"kv_cache": "static"}})
    r = cli("bench", str(tmp_path / "static"), "--backend", "ort", "--cuda-graphs", "--input-len", "8",
            "--output-len", "4")
    if cuda_provider_usable():
        assert r.returncode == 0 and "ONNX Runtime (cuda, CUDA graphs)" in r.stderr, r.stderr
    else:
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "--cuda-graphs on ONNX Runtime needs its CUDA provider (onnxruntime-gpu and a GPU)" in r.stderr


def test_run_errors_are_one_line(text_build, builds):
    r = cli("run", str(text_build))
    assert r.returncode == 2 and "give --prompt, --input-file or --chat" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", str(builds["glm"]), "--prompt", "x")
    assert r.returncode == 1 and "no tokenizer.json" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", str(text_build), "--prompt", "x", "--top-p", "0")
    assert r.returncode == 2 and "top_p" in r.stderr
    r = cli("run", str(text_build), "--prompt", "x", "--backend", "trt")
    assert r.returncode == 1 and "--backend trt: the build has no engine" in r.stderr
    r = cli("run", str(text_build), "--prompt", "x", "--cuda-graphs")
    assert r.returncode == 2 and "--cuda-graphs needs a build with a static KV cache" in r.stderr
    r = cli("bench", str(text_build), "--backend", "ort", "--cuda-graphs")
    assert r.returncode == 2 and "--cuda-graphs needs a build with a static KV cache" in r.stderr
    assert "Traceback" not in r.stderr


def test_bench_json_is_the_same_for_every_backend(text_build):
    import json

    r = cli("bench", str(text_build), "--backend", "ort", "--batch", "2", "--input-len", "16", "--output-len", "8",
            "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"backend", "int8_gemm", "batch", "input_len", "output_len", "ttft_ms", "decode_tokens_per_s",
                        "decode_tokens_per_s_all_rows", "p50_ms", "p99_ms", "peak_rss_mb", "device_memory_mb"}
    assert out["decode_tokens_per_s"] > 0 and out["p99_ms"] >= out["p50_ms"] > 0
