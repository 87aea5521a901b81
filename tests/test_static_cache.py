"""`shapes.kv_cache: static`: fixed cache slots updated in place by TensorScatter. Checked against the dynamic
build of the same export in ONNX Runtime (prefill of a left-padded batch, then decode steps; generation; prefix
reuse, which must not see the in-place writes), and built by TensorRT-RTX into its KV-cache-update layers."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import left_padded
from trtglm.core.errors import TrtglmError
from trtglm.engine.build import build
from trtglm.engine.static_cache import make_static
from trtglm.export.exporter import export, sha256
from trtglm.runtime.backends import OrtBackend
from trtglm.runtime.generate import generate, make_prefix

STATIC = {"shapes": {"kv_cache": "static", "max_seq_len": 48}}
DYNAMIC = {"shapes": {"kv_cache": "dynamic", "max_seq_len": 48}}
PROMPTS = [[5, 17, 99, 3, 42, 8, 150], [11, 12], [77, 1, 60, 61]]


@pytest.fixture(scope="module")
def pairs(exports, tmp_path_factory):
    """family -> (dynamic onnx-only build, static onnx-only build of 48 slots), both planned for 48 tokens."""
    root = tmp_path_factory.mktemp("static")
    return {f: (build(exports[f], root / f"{f}-dynamic", onnx_only=True, overrides=DYNAMIC) and root / f"{f}-dynamic",
                build(exports[f], root / f"{f}-static", onnx_only=True, overrides=STATIC) and root / f"{f}-static")
            for f in ("glm", "glm4", "chatglm")}


@pytest.mark.parametrize("family", ["glm", "glm4", "chatglm"])
def test_static_cache_computes_what_the_dynamic_one_does(pairs, family):
    dynamic, static = (OrtBackend(p / "model.onnx") for p in pairs[family])
    longest = max(map(len, PROMPTS))
    ids, mask, pos = left_padded(PROMPTS)
    a, cache_a = dynamic.forward(ids, mask, pos, dynamic.new_cache(3))
    b, cache_b = static.forward(ids, mask, pos, static.new_cache(3))
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    for step in range(3):
        mask, pos = np.concatenate([mask, np.ones((3, 1), np.int64)], 1), pos[:, -1:] + 1
        token = np.array([[3 + step], [40], [7 * step]])
        a, cache_a = dynamic.forward(token, mask, pos, cache_a)
        b, cache_b = static.forward(token, mask, pos, cache_b)
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    assert cache_b.length == longest + 3
    for past, present in zip(cache_a, cache_b.values):  # written in place: the filled slots hold the cache
        np.testing.assert_allclose(present.numpy()[:, :, :cache_b.length], past.numpy(), atol=1e-5, rtol=0)


def test_graph_manifest_and_weights(pairs, tmp_path):
    dynamic, static = pairs["glm4"]
    graph = onnx.load(static / "model.onnx", load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("TensorScatter") == 4 and "Concat" not in [
        n.op_type for n in graph.graph.node if any(o.startswith("present.") for o in n.output)]
    assert {o.domain or "": o.version for o in graph.opset_import}[""] == 24
    onnx.checker.check_model(str(static / "model.onnx"), full_check=True)  # strict shape inference too
    io = json.loads((static / "manifest.json").read_text())["io"]
    shapes = {t["name"]: t["shape"] for t in io["inputs"] + io["outputs"]}
    assert shapes["cache_position"] == ["batch"] and shapes["attention_mask"] == ["batch", 48]
    assert shapes["past_key_values.1.value"] == shapes["present.1.value"] == ["batch", 2, 48, 16]
    # keys rotated by RotaryEmbedding, not folded into their projection: a static cache's default (build._resolve)
    manifest = json.loads((static / "manifest.json").read_text())
    assert "rotary_keys" in manifest["fusion"]["fusions"] and "rotary_keys_folded" not in manifest["fusion"]["fusions"]
    assert manifest["fusion"]["fused"]["rotary"] == ops.count("RotaryEmbedding") == 4  # q and k of 2 layers
    same = build(manifest["source"]["export_dir"], tmp_path / "d", onnx_only=True, overrides=DYNAMIC,
                 fusions=frozenset(manifest["fusion"]["fusions"]))
    assert sha256(static / "model.onnx.data") == sha256(tmp_path / "d" / "model.onnx.data")  # only the graph changed
    assert same["fusion"]["fused"] == manifest["fusion"]["fused"]
    with pytest.raises(TrtglmError, match="static KV cache already"):
        make_static(static / "model.onnx", 48)


def test_generation_prefix_reuse_and_length_limit(pairs):
    dynamic, static = (OrtBackend.from_build(p) for p in pairs["glm4"])
    assert static.max_seq_len == 48
    assert generate(static, PROMPTS, max_new_tokens=12).tokens == generate(dynamic, PROMPTS, max_new_tokens=12).tokens
    prefix = make_prefix(static, [9, 8, 7, 6])
    first = generate(static, [[1, 2], [3, 4, 5]], prefix=prefix, max_new_tokens=6).tokens
    again = generate(static, [[1, 2], [3, 4, 5]], prefix=prefix, max_new_tokens=6).tokens  # prefix not overwritten
    full = generate(static, [[9, 8, 7, 6, 1, 2], [9, 8, 7, 6, 3, 4, 5]], max_new_tokens=6).tokens
    assert first == again == full
    alone = [generate(static, [[1, 2]], prefix=prefix, max_new_tokens=6).tokens for _ in range(2)]  # batch 1 too
    assert alone[0] == alone[1] == full[:1]
    r = generate(static, [list(range(3, 43))], max_new_tokens=100)  # 40 prompt tokens + 8 slots left
    assert len(r.tokens[0]) == 8
    with pytest.raises(TrtglmError, match="49 tokens do not fit the static KV cache's 48 slots"):
        static.forward(np.ones((1, 49), np.int64), np.ones((1, 49), np.int64), np.arange(49)[None], static.new_cache(1))


def test_onnx_runtime_attends_over_the_filled_slots_only(pairs, tmp_path):
    """The ORT backend's in-memory window (cache_window.py): each Attention reads slots [0, max(cache_position)+S),
    not all 48, and computes what the full-width graph computes (the left-padded batch, prefill and decode)."""
    import onnx_ir as ir

    from trtglm.runtime.cache_window import window

    static = pairs["glm4"][1]
    # On the CPU provider both: `full` swaps in a CPU session, and the caches live where the session computes.
    windowed = OrtBackend(static / "model.onnx", device="cpu", profile=tmp_path / "ort")
    assert window(ir.load(static / "model.onnx")) == 2 and window(ir.load(pairs["glm4"][0] / "model.onnx")) == 0
    full = OrtBackend(static / "model.onnx", device="cpu")
    full.session = ort.InferenceSession(str(static / "model.onnx"))  # the graph as built: attention over 48 slots
    longest = max(map(len, PROMPTS))
    ids, mask, pos = left_padded(PROMPTS)
    a, cache_a = full.forward(ids, mask, pos, full.new_cache(3))
    b, cache_b = windowed.forward(ids, mask, pos, windowed.new_cache(3))
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    mask, pos = np.concatenate([mask, np.ones((3, 1), np.int64)], 1), pos[:, -1:] + 1
    a, _ = full.forward(np.array([[4], [5], [6]]), mask, pos, cache_a)
    b, _ = windowed.forward(np.array([[4], [5], [6]]), mask, pos, cache_b)
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    trace = windowed.session.end_profiling()
    keys = [e["args"]["input_type_shape"][1] for e in json.load(open(trace))
            if e.get("cat") == "Node" and e["args"].get("op_name") == "Attention" and e["name"].endswith("_kernel_time")]
    assert [list(k.values())[0][2] for k in keys] == [longest] * 2 + [longest + 1] * 2  # 2 layers, 2 steps


def test_static_cache_needs_fused_attention(exports, tmp_path):
    with pytest.raises(TrtglmError, match="kv_cache: static needs the attention fusion"):
        build(exports["glm4"], tmp_path / "b", onnx_only=True, overrides=STATIC, fusions=frozenset(), strict=False)
    assert not (tmp_path / "b").exists()


def test_engine_uses_tensorrts_kv_cache_update_layer(checkpoints, tmp_path):
    from trtglm.engine.inspect import inspect_path
    from trtglm.runtime.trt import plan_buffers

    export(str(checkpoints["glm4"]), tmp_path / "e", dtype="fp16", validate=False, max_seq_len=64)
    shapes = {"max_batch": 2, "max_input_len": 16, "max_seq_len": 64, "kv_cache": "static"}
    m = build(tmp_path / "e", tmp_path / "b", overrides={"shapes": shapes}, use_cache=False)
    layers = json.loads((tmp_path / "b" / "layers.json").read_text())
    types = layers["network_layer_types"]
    assert types["KV_CACHE_UPDATE"] == 4  # one profile: attention decomposed for Myelin (engine_graph.py)
    assert m["engine_graph"]["attention"] == "decomposed" and "ATTENTION_INPUT" not in types
    # keys rotated by RotaryEmbedding feeding the cache update: builds (feeding a cache Concat it does not, README)
    assert types["ROTARY_EMBEDDING"] == 4 and "rotary_keys" in m["fusion"]["fusions"]
    assert any("mha" in layer["name"] for layer in layers["engine_layers"])
    (profile,) = m["profiles"]  # the cache is the same size at every step: only batch and new tokens vary
    assert profile["past_key_values.0.key"] == [[1, 2, 64, 16], [1, 2, 64, 16], [2, 2, 64, 16]]
    assert profile["attention_mask"] == [[1, 64], [1, 64], [2, 64]] and profile["cache_position"] == [[1], [1], [2]]
    plan = plan_buffers(m)
    assert plan["present.0.key"].max_shape == plan["past_key_values.0.key"].max_shape == (2, 2, 64, 16)
    assert inspect_path(tmp_path / "b")["graph"] == {"logits": "last", "kv_cache": "static", "max_seq_len": 64}


def test_step_inputs_both_runtimes_feed():
    """The TensorRT runner and the ONNX Runtime backend feed a static graph through this one function."""
    from trtglm.engine.static_cache import step_inputs

    feeds = step_inputs(np.array([[0, 1, 1, 1], [1, 1, 1, 1]]), cached=3, slots=6)
    np.testing.assert_array_equal(feeds["attention_mask"], [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(feeds["cache_position"], [3, 3])
    assert feeds["attention_mask"].dtype == feeds["cache_position"].dtype == np.int64
    with pytest.raises(TrtglmError, match="7 tokens do not fit the static KV cache's 6 slots"):
        step_inputs(np.ones((1, 7), np.int64), cached=6, slots=6)


def test_cli_flags_reach_the_graph(exports, tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "trtglm", "build", str(exports["glm4"]), "-o", str(tmp_path / "b"),
                        "--onnx-only", "--kv-cache", "static", "--logits", "last", "--max-seq-len", "32", "--json"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    shapes = {t["name"]: t["shape"] for side in json.loads(p.stdout)["io"].values() for t in side}
    assert shapes["logits"][:2] == ["batch", 1] and shapes["present.0.key"][2] == 32 and "cache_position" in shapes
    p = subprocess.run([sys.executable, "-m", "trtglm", "inspect", str(tmp_path / "b")], capture_output=True, text=True)
    assert "graph: logits of the last position, static KV cache of 32 slots" in p.stdout
