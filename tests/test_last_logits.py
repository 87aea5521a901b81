"""`shapes.logits: last`: the lm_head on the last position only. Its logits are the last row of the full graph's
(ONNX Runtime), generation is unchanged, a quantized lm_head keeps its Q/DQ pair, the gate still runs on every
position, eval refuses, and TensorRT-RTX builds it with a one-row logits buffer."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from models import EVERY_POSITION, left_padded
from trtglm.core.errors import TrtglmError, UsageError
from trtglm.engine.build import build
from trtglm.engine.last_logits import keep_last_position
from trtglm.export.exporter import export, sha256
from trtglm.runtime.backends import OrtBackend
from trtglm.runtime.evaluate import evaluate
from trtglm.runtime.generate import generate

MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-glm4"
LAST = {"shapes": {"logits": "last"}}  # the default, said where a test compares it with every position
PROMPTS = [[5, 17, 99, 3, 42, 8, 150], [11, 12], [77, 1, 60, 61]]


@pytest.fixture(scope="module")
def pairs(exports, tmp_path_factory):
    """family -> (onnx-only build with every position's logits, the same with the last position's)."""
    root = tmp_path_factory.mktemp("last")
    return {f: (build(exports[f], root / f"{f}-all", onnx_only=True, overrides=EVERY_POSITION) and root / f"{f}-all",
                build(exports[f], root / f"{f}-last", onnx_only=True, overrides=LAST) and root / f"{f}-last")
            for f in ("glm", "glm4", "chatglm")}


@pytest.mark.parametrize("family", ["glm", "glm4", "chatglm"])
def test_last_position_logits_are_the_full_graphs_last_row(pairs, family):
    full, last = (OrtBackend(p / "model.onnx") for p in pairs[family])
    ids, mask, pos = left_padded(PROMPTS)
    a, cache_a = full.forward(ids, mask, pos, full.new_cache(3))
    b, cache_b = last.forward(ids, mask, pos, last.new_cache(3))
    assert a.shape[1] == len(PROMPTS[0]) and b.shape == (3, 1, a.shape[2])
    np.testing.assert_allclose(b, a[:, -1:], atol=1e-5, rtol=0)
    for x, y in zip(getattr(cache_a, "values", cache_a), getattr(cache_b, "values", cache_b)):  # same KV cache
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    step = (np.array([[3], [4], [5]]), np.concatenate([mask, np.ones((3, 1), np.int64)], 1), pos[:, -1:] + 1)
    np.testing.assert_allclose(last.forward(*step, cache_b)[0], full.forward(*step, cache_a)[0], atol=1e-5, rtol=0)


def test_generation_and_weights_are_unchanged(pairs):
    full, last = pairs["glm4"]
    assert generate(OrtBackend(last / "model.onnx"), PROMPTS, max_new_tokens=8).tokens == \
        generate(OrtBackend(full / "model.onnx"), PROMPTS, max_new_tokens=8).tokens
    assert sha256(last / "model.onnx.data") == sha256(full / "model.onnx.data")  # only the graph changed
    outputs = json.loads((last / "manifest.json").read_text())["io"]["outputs"]
    assert outputs[0]["name"] == "logits" and outputs[0]["shape"][:2] == ["batch", 1]
    graph = onnx.load(last / "model.onnx", load_external_data=False).graph
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim][1:] == [1, 160]
    with pytest.raises(TrtglmError, match="computes the last position's logits already"):
        keep_last_position(last / "model.onnx")


@pytest.mark.parametrize("family", ["glm", "glm4", "chatglm"])
def test_the_last_layer_runs_on_the_last_position_after_its_cache(pairs, family):
    """Its attention, o_proj and MLP read one row (queries, mask rows and residual sliced), while its keys and
    values still cover every position: the presents are those of the full graph (the logits test above)."""
    import onnxruntime as ort

    last = pairs[family][1]
    model = onnx.load(last / "model.onnx")
    names = {n.name for n in model.graph.node}
    assert {"last_layer.query", "last_layer.mask", "last_layer.residual", "last_position"} <= names
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    down, up = matmuls[-2].output[0], matmuls[-3].output[0]  # the last layer's MLP (the lm_head is last)
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in (down, up))
    session = ort.InferenceSession(model.SerializeToString())
    ids, mask, pos = left_padded(PROMPTS)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
             **{i.name: np.zeros((3, 2, 0, 16), np.float32) for i in session.get_inputs()
                if i.name.startswith("past_key_values.")}}
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    assert out[down].shape[:2] == out[up].shape[:2] == (3, 1)
    assert out["present.1.key"].shape[2] == len(PROMPTS[0])  # the last layer's cache: every position


def test_static_cache_with_last_position_logits(exports, tmp_path):
    """Both options: the static cache's one shared mask is built first, then sliced for the last layer (and the
    ORT backend's cache window slices that too); logits are the dynamic full graph's last row."""
    full = build(exports["glm4"], tmp_path / "full", onnx_only=True, overrides=EVERY_POSITION) and tmp_path / "full"
    both = build(exports["glm4"], tmp_path / "both", onnx_only=True,
                 overrides={"shapes": {"logits": "last", "kv_cache": "static", "max_seq_len": 48}}) and tmp_path / "both"
    onnx.checker.check_model(str(both / "model.onnx"), full_check=True)
    a, b = OrtBackend(full / "model.onnx"), OrtBackend.from_build(both)
    ids, mask, pos = left_padded(PROMPTS)
    x, cache_a = a.forward(ids, mask, pos, a.new_cache(3))
    y, cache_b = b.forward(ids, mask, pos, b.new_cache(3))
    np.testing.assert_allclose(y, x[:, -1:], atol=1e-5, rtol=0)
    step = (np.array([[3], [4], [5]]), np.concatenate([mask, np.ones((3, 1), np.int64)], 1), pos[:, -1:] + 1)
    np.testing.assert_allclose(b.forward(*step, cache_b)[0], a.forward(*step, cache_a)[0], atol=1e-5, rtol=0)
    assert generate(b, PROMPTS, max_new_tokens=6).tokens == generate(a, PROMPTS, max_new_tokens=6).tokens


def test_quantized_lm_head_keeps_its_pair_and_the_gate_sees_every_position(tmp_path):
    """int8 with the lm_head quantized: the Slice goes before its QuantizeLinear (so TensorRT and ONNX Runtime's
    integer GEMM see Q-DQ-MatMul); the gate inside the build measured every position first; eval refuses."""
    import onnx_ir as ir

    from trtglm.runtime.integer_gemm import lower

    export(str(MODEL), tmp_path / "e", validate=False, max_seq_len=256)
    m = build(tmp_path / "e", tmp_path / "b", onnx_only=True, cache_dir=tmp_path / "cache",
              overrides={"precision": {"dtype": "int8", "quantization": {"lm_head": True}},
                         "calibration": {"samples": 8, "seq_len": 64},
                         "accuracy": {"gate": True, "samples": 4, "seq_len": 64}, **LAST})
    assert m["accuracy"]["tokens"] == 4 * 64 and m["accuracy"]["gate"]["passed"]
    assert m["precision"]["quantized_nodes"] == 17 and m["precision"]["kept_half"] == []
    graph = onnx.load(tmp_path / "b" / "model.onnx", load_external_data=False).graph
    users = [n.op_type for n in graph.node if any(i.endswith(".last_position") for i in n.input)]
    assert users == ["QuantizeLinear"]
    assert lower(ir.load(tmp_path / "b" / "model.onnx")) == 17
    with pytest.raises(UsageError, match="computes the logits of the last position only"):
        evaluate(tmp_path / "b", tmp_path / "e")
    p = subprocess.run([sys.executable, "-m", "trtglm", "eval", str(tmp_path / "b"), "--reference",
                        str(tmp_path / "e")], capture_output=True, text=True)
    assert p.returncode == 2 and "perplexity needs every position" in p.stderr and "Traceback" not in p.stderr


def test_engine_builds_with_a_one_row_logits_buffer(pairs, checkpoints, tmp_path):
    from trtglm.runtime.trt import plan_buffers

    export(str(checkpoints["glm4"]), tmp_path / "e", dtype="fp16", validate=False, max_seq_len=64)
    shapes = {"max_batch": 2, "max_input_len": 16, "max_seq_len": 64}
    m = build(tmp_path / "e", tmp_path / "b", overrides={"shapes": shapes | LAST["shapes"]}, use_cache=False)
    assert m["engine"]["kernels"] > 0
    assert plan_buffers(m)["logits"].max_shape == (2, 1, 160)
    full = build(tmp_path / "e", tmp_path / "a", overrides={"shapes": shapes | EVERY_POSITION["shapes"]}, use_cache=False)
    assert full["estimate"]["activation_bytes"] - m["estimate"]["activation_bytes"] == 2 * 15 * 160 * 4
