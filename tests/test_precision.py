"""The precision stage on the shipped trained model: each mode's graph (node types), its accuracy with ONNX
Runtime against the fp32 export, its TensorRT-RTX build for a valid target, and refusal of an invalid one."""

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from models import (
    EVERY_POSITION,  # perplexity and logits comparisons need every position
)
from trtglm.core.errors import TrtglmError, UsageError
from trtglm.engine.build import build
from trtglm.export.exporter import export, sha256
from trtglm.precision.calibration import CalibrationError, CalibrationSet, token_windows
from trtglm.runtime.evaluate import GateFailed, evaluate

MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-glm4"
CALIB = {"calibration": {"samples": 16, "seq_len": 128}}
SHAPES = {"shapes": {"max_batch": 1, "max_input_len": 64, "max_seq_len": 128}}
GOALS = {"fp16": 0.005, "int8": 0.03, "fp8": 0.03, "int4": 0.10}  # perplexity delta, from the issue


@pytest.fixture(scope="module")
def e32(tmp_path_factory):
    out = tmp_path_factory.mktemp("prec") / "e32"
    export(str(MODEL), out, validate=False, max_seq_len=256)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def graphs(e32, cache, tmp_path_factory):
    """dtype -> onnx-only build of the shipped model's fp32 export."""
    root = tmp_path_factory.mktemp("graphs")
    out = {}
    for dtype in ("fp16", "bf16", "int8", "fp8", "int4"):
        build(e32, root / dtype, onnx_only=True, cache_dir=cache,
              overrides={"precision": {"dtype": dtype}, **CALIB, **EVERY_POSITION})
        out[dtype] = root / dtype
    return out


def _model(build_dir: Path) -> onnx.ModelProto:
    return onnx.load(build_dir / "model.onnx")


def _io_types(m: onnx.ModelProto) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]}


def _inits(m: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in m.graph.initializer}


@pytest.mark.parametrize("dtype", ["fp16", "int8", "fp8", "int4"])
def test_accuracy_within_the_goal(graphs, e32, dtype):
    r = evaluate(graphs[dtype], e32, samples=8, seq_len=128, backend="ort")
    assert r["perplexity_delta"] <= GOALS[dtype], r
    assert r["gate"]["passed"], r["gate"]  # the precision's default limits (ACCURACY_GOALS) hold too
    assert 1 < r["reference_perplexity"] < 100


def test_fp16_graph_types(graphs):
    m = _model(graphs["fp16"])
    io = _io_types(m)
    assert io["logits"] == TensorProto.FLOAT and io["input_ids"] == TensorProto.INT64
    assert io["past_key_values.0.key"] == io["present.3.value"] == TensorProto.FLOAT16
    weights = _inits(m)
    assert weights["model.layers.0.mlp.down_proj.weight"].data_type == TensorProto.FLOAT16
    assert not [n for n, t in weights.items() if t.data_type == TensorProto.FLOAT and np.prod(t.dims) > 1024]
    manifest = json.loads((graphs["fp16"] / "manifest.json").read_text())
    assert manifest["precision"]["from"] == "fp32" and manifest["precision"]["fp32_islands"]["overflowing_nodes"] == []
    assert manifest["calibration"]["method"] == "minmax" and manifest["calibration"]["samples"] == 16


def test_bf16_weights_are_the_fp32_weights_rounded(graphs, e32):
    m = _model(graphs["bf16"])
    io = _io_types(m)
    assert io["past_key_values.0.key"] == TensorProto.BFLOAT16 and io["logits"] == TensorProto.FLOAT
    ref = onnx.load(e32 / "model.onnx")
    name = "model.layers.1.mlp.down_proj.weight"
    expected = numpy_helper.to_array(_inits(ref)[name]).astype(ml_dtypes.bfloat16)
    got = numpy_helper.to_array(_inits(m)[name])
    assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got.view(np.uint16), expected.view(np.uint16))
    assert not any(n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16 for n in m.graph.node)
    with pytest.raises(TrtglmError, match="bf16 cannot run on ONNX Runtime"):
        evaluate(graphs["bf16"], e32, samples=1, seq_len=16)


def _qdq(m: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if n.op_type == op]


@pytest.mark.parametrize("dtype,qtype", [("int8", TensorProto.INT8), ("fp8", TensorProto.FLOAT8E4M3FN)])
def test_w8a8_is_symmetric_per_channel_qdq_on_the_linear_layers(graphs, dtype, qtype):
    m = _model(graphs[dtype])
    inits = _inits(m)
    dq, q = _qdq(m, "DequantizeLinear"), _qdq(m, "QuantizeLinear")
    weights = [n for n in dq if n.input[0] in inits]
    assert len(weights) == len(q) == 4 * 4  # 4 layers x (qkv, o, gate_up, down), one activation each
    for n in dq + q:
        zp = inits[n.input[2]]
        assert zp.data_type == qtype and not numpy_helper.to_array(zp).astype(np.float32).any()  # zero-point 0
    for n in weights:
        w, scale = inits[n.input[0]], inits[n.input[1]]
        assert w.data_type == qtype and list(scale.dims) == [w.dims[1]]  # per output channel
        assert scale.data_type == TensorProto.FLOAT16  # the rest of the graph is fp16
    assert _inits(m)["lm_head.weight"].data_type == TensorProto.FLOAT16  # the lm_head stays half
    manifest = json.loads((graphs[dtype] / "manifest.json").read_text())["precision"]
    assert manifest["quantized_nodes"] == 16 and len(manifest["kept_half"]) == 1


def test_int4_is_signed_blockwise_weight_only_without_zero_point(graphs):
    m = _model(graphs["int4"])
    inits = _inits(m)
    dq = _qdq(m, "DequantizeLinear")
    assert len(dq) == 16 and not _qdq(m, "QuantizeLinear")  # weight-only: activations stay fp16
    for n in dq:
        assert len(n.input) == 2  # no zero-point
        w, scale = inits[n.input[0]], inits[n.input[1]]
        attrs = {a.name: a.i for a in n.attribute}
        assert w.data_type == TensorProto.INT4 and attrs["block_size"] == 128 and attrs["axis"] == 0
        assert list(scale.dims) == [w.dims[0] // 128, w.dims[1]] and scale.data_type == TensorProto.FLOAT16


ENGINE_DTYPES = {"fp16": ("Half", "Half"), "bf16": ("BFloat16", "BFloat16"), "int8": ("Int8", "Int8"),
                 "fp8": ("FP8", "FP8"), "int4": ("Half", "Int4")}


@pytest.mark.parametrize("dtype,target", [("fp16", "sm75"), ("bf16", "sm80"), ("int8", "sm86"), ("fp8", "sm89"),
                                          ("int4", "sm120")])
def test_tensorrt_rtx_builds_each_precision(e32, cache, tmp_path, dtype, target):
    """GEMMs of the engine read and hold the precision's datatypes (from the build's detailed layer log)."""
    m = build(e32, tmp_path / "b", cache_dir=cache, use_cache=False,
              overrides={"precision": {"dtype": dtype}, "builder": {"targets": target}, **CALIB, **SHAPES})
    assert m["precision"]["dtype"] == dtype and m["targets"] == [target]
    layers = json.loads((tmp_path / "b" / "layers.json").read_text())["engine_layers"]
    reads, holds = ENGINE_DTYPES[dtype]
    gemms = [x for x in layers if holds in x["holds"] and reads in x["reads"] and x["type"] in ("gemm", "runtime_fusion")]
    assert len(gemms) >= 4 * 3, [(x["type"], x["reads"], x["holds"]) for x in layers]
    from trtglm.engine.inspect import inspect_path

    assert inspect_path(tmp_path / "b")["gemm_datatypes"][f"{reads} x {holds}"] == len(gemms)


@pytest.mark.parametrize("dtype,target,message", [("int4", "sm75", "int4 needs SM80"), ("fp8", "sm86", "fp8 needs SM89"),
                                                  ("bf16", "sm75", "bf16 needs SM80")])
def test_precision_refused_for_a_target_that_cannot_run_it(e32, tmp_path, dtype, target, message):
    with pytest.raises(TrtglmError, match=message):
        build(e32, tmp_path / "b", overrides={"precision": {"dtype": dtype}, "builder": {"targets": target}})
    assert not (tmp_path / "b").exists()


def test_calibration_cache_hit_gives_the_same_graph(e32, tmp_path, graphs):
    m = build(e32, tmp_path / "b", onnx_only=True, cache_dir=graphs["int8"].parent.parent / "cache_unused",
              overrides={"precision": {"dtype": "int8"}, **CALIB})
    assert m["precision"]["calibration_cache"]["hit"] is False
    again = build(e32, tmp_path / "c", onnx_only=True, cache_dir=graphs["int8"].parent.parent / "cache_unused",
                  overrides={"precision": {"dtype": "int8"}, **CALIB})
    assert again["precision"]["calibration_cache"] == {**m["precision"]["calibration_cache"], "hit": True}
    assert sha256(tmp_path / "b" / "model.onnx.data") == sha256(tmp_path / "c" / "model.onnx.data")
    other = build(e32, tmp_path / "d", onnx_only=True, cache_dir=graphs["int8"].parent.parent / "cache_unused",
                  overrides={"precision": {"dtype": "int8"}, "calibration": {"samples": 8, "seq_len": 128}})
    assert other["precision"]["calibration_cache"]["hit"] is False  # other data, other key


def _float_types(m: onnx.ModelProto) -> dict[str, int]:
    m = onnx.shape_inference.infer_shapes(m)
    return {v.name: v.type.tensor_type.elem_type for v in [*m.graph.value_info, *m.graph.input, *m.graph.output]}


def _absmax_per_tensor(path: Path, feeds: dict) -> dict[str, float]:
    """Every node output of an fp32 graph, by name, measured with ONNX Runtime (all optimizations off)."""
    import onnxruntime as ort

    m = onnx.load(path)
    names = [o for n in m.graph.node for o in n.output if o]
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(m.SerializeToString(), opts)
    return {n: float(np.abs(v).max()) for n, v in zip(names, s.run(None, feeds))
            if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.size}


def test_fp32_islands_keep_overflowing_tensors_in_fp32(tmp_path):
    """A norm weight scaled by 5e4 drives the MLP's activations past fp16's range (measured on the fp32 graph).
    The calibrated ranges keep every node touching them in fp32, and the fp16 graph follows the fp32 one; a
    blind conversion types them fp16 (ONNX Runtime's CPU kernels compute fp16 in fp32 and hide the overflow,
    so the check is on types; TensorRT computes them in fp16)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from trtglm.precision.calibration import EVAL_DATA
    from trtglm.precision.half import to_half
    from trtglm.runtime.backends import OrtBackend

    ckpt = tmp_path / "loud"
    shutil.copytree(MODEL, ckpt)
    w = load_file(ckpt / "model.safetensors")
    w["model.layers.2.post_attention_layernorm.weight"] *= 5e4
    save_file(w, ckpt / "model.safetensors")
    export(str(ckpt), tmp_path / "e", validate=False, max_seq_len=256)
    build(tmp_path / "e", tmp_path / "f32", onnx_only=True,  # the fused graph, still fp32, fed below by hand
          overrides={"shapes": {"kv_cache": "dynamic", "logits": "all"}})
    m = build(tmp_path / "e", tmp_path / "b", onnx_only=True, cache_dir=tmp_path / "cache",
              overrides={"precision": {"dtype": "fp16"}, **CALIB, **EVERY_POSITION})
    islands = set(m["precision"]["fp32_islands"]["overflowing_nodes"])
    ids = token_windows(EVAL_DATA, MODEL, 64, 1, 3072)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(64)[None],
             **{f"past_key_values.{i}.{k}": np.zeros((1, 2, 0, 32), np.float32) for i in range(4)
                for k in ("key", "value")}}
    absmax = _absmax_per_tensor(tmp_path / "f32" / "model.onnx", feeds)
    fused = onnx.load(tmp_path / "f32" / "model.onnx")
    loud = {n.name for n in fused.graph.node if any(absmax.get(o, 0) > 65504 for o in [*n.input, *n.output])}
    assert loud and loud <= islands

    def output_types(model: onnx.ModelProto) -> dict[str, set[int]]:
        types = _float_types(model)
        return {n.name: {types.get(o) for o in n.output} for n in model.graph.node}

    assert all(output_types(_model(tmp_path / "b"))[n] == {TensorProto.FLOAT} for n in loud)
    blind = to_half(onnx.load(tmp_path / "f32" / "model.onnx"), "fp16")
    assert any(TensorProto.FLOAT16 in output_types(blind)[n] for n in loud)

    def logits(path):
        b = OrtBackend(path)
        return b.forward(ids, feeds["attention_mask"], feeds["position_ids"], b.new_cache(1))[0]

    ref, half = logits(tmp_path / "e" / "model.onnx"), logits(tmp_path / "b" / "model.onnx")
    assert np.isfinite(half).all() and (half.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_gate_inside_build_publishes_nothing_when_out_of_bounds(e32, cache, tmp_path):
    with pytest.raises(GateFailed, match="accuracy gate failed: .*agreement"):
        build(e32, tmp_path / "b", onnx_only=True, cache_dir=cache,
              overrides={"precision": {"dtype": "int4"}, "accuracy": {"gate": True, "min_next_token_agreement": 1.0,
                                                                        "samples": 2, "seq_len": 64}})
    assert not (tmp_path / "b").exists()
    m = build(e32, tmp_path / "ok", onnx_only=True, cache_dir=cache,
              overrides={"precision": {"dtype": "int4"}, "accuracy": {"gate": True, "samples": 2, "seq_len": 64}})
    assert m["accuracy"]["gate"]["passed"] and m["accuracy"]["gate"]["limits"]["max_ppl_delta"] == 0.10


def test_gate_fails_scales_multiplied_by_100(graphs, e32, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(graphs["int8"], broken)
    m = onnx.load(broken / "model.onnx")
    (scale,) = [t for t in m.graph.initializer if t.name == "model.layers.1.self_attn.qkv_proj.weight_scale"]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float16(100), scale.name))
    # (a scale before one of glm4's post-norms would be normalized away; q and k's sharpen the attention)
    onnx.save(m, broken / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    r = evaluate(broken, e32, samples=4, seq_len=128, backend="ort")
    assert not r["gate"]["passed"] and r["perplexity_delta"] > 0.03


def test_calibration_input_errors(e32, tmp_path):
    with pytest.raises(CalibrationError, match="no such data file"):
        CalibrationSet.load(tmp_path / "none.jsonl", MODEL, 4, 64, "minmax", 3072)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CalibrationError, match="no text"):
        CalibrationSet.load(empty, MODEL, 4, 64, "minmax", 3072)
    short = tmp_path / "short.txt"
    short.write_text("In the beginning God created the heaven and the earth.")
    with pytest.raises(CalibrationError, match="shorter than the calibration sequence length 256"):
        CalibrationSet.load(short, MODEL, 4, 256, "minmax", 3072)
    with pytest.raises(CalibrationError, match="fewer than the 10000 samples"):
        CalibrationSet.load(None, MODEL, 10000, 256, "minmax", 3072)
    with pytest.raises(CalibrationError, match="outside the model's vocabulary of 100: tokenizer and model do not"):
        CalibrationSet.load(None, MODEL, 4, 64, "minmax", 100)
    with pytest.raises(CalibrationError, match="shorter than"):  # through build, before any work
        build(e32, tmp_path / "b", onnx_only=True, overrides={"precision": {"dtype": "int8"},
                                                              "calibration": {"data": str(short)}})
    assert not (tmp_path / "b").exists()


def test_cli_quantized_build_and_errors(e32, cache, tmp_path):
    cmd = [sys.executable, "-m", "trtglm", "build", str(e32), "-o", str(tmp_path / "b"), "--int8", "--onnx-only",
           "--calib-samples", "8", "--calib-seq-len", "64", "--calib-method", "entropy", "--cache-dir", str(cache)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "precision: fp32 -> int8, 16 linear layers quantized, calibrated on 8 x 64 tokens (entropy)" in p.stdout
    p = subprocess.run([*cmd[:6], str(tmp_path / "c"), *cmd[7:], "--calib-data", str(tmp_path / "nope.jsonl")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("trtglm: error: ") and "no such data file" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "c").exists()
    with pytest.raises(UsageError, match="block size 96 does not divide the input width 256"):
        build(e32, tmp_path / "d", onnx_only=True, overrides={"precision": {"dtype": "int4",
                                                                            "quantization": {"block_size": 96}}})


def test_manifest_io_follows_the_converted_graph(graphs):
    """The engine runner sizes its buffers from the manifest: an fp16 KV cache must be recorded as fp16."""
    from trtglm.runtime.trt import plan_buffers

    for dtype, kv in (("fp16", "float16"), ("bf16", "bfloat16"), ("int8", "float16")):
        io = json.loads((graphs[dtype] / "manifest.json").read_text())["io"]
        types = {s["name"]: s["dtype"] for s in io["inputs"] + io["outputs"]}
        assert types["past_key_values.0.key"] == types["present.3.value"] == kv
        assert types["logits"] == "float32" and types["input_ids"] == "int64"
    manifest = json.loads((graphs["int8"] / "manifest.json").read_text())
    manifest["profiles"] = [{n: [[1, 1], [1, 8], [1, 16]] for n in ("input_ids", "position_ids")}
                            | {"attention_mask": [[1, 1], [1, 9], [1, 20]]}
                            | {f"past_key_values.{i}.{k}": [[1, 2, 0, 32], [1, 2, 1, 32], [1, 2, 4, 32]]
                               for i in range(4) for k in ("key", "value")}]
    assert plan_buffers(manifest)["present.0.key"].nbytes == 1 * 2 * 20 * 32 * 2  # fp16


def test_ort_runs_int8_as_integer_gemms(graphs, e32):
    """On the CPU the backend runs every quantized MatMul of the int8 graph as an integer GEMM (as TensorRT does;
    integer_gemm.py); its logits are as close to the fp32 export's as those of a session that dequantizes every
    weight at every step (the Q/DQ graph as written), and close to them."""
    import onnx_ir as ir
    import onnxruntime as ort

    from trtglm.runtime.backends import OrtBackend
    from trtglm.runtime.integer_gemm import lower

    manifest = json.loads((graphs["int8"] / "manifest.json").read_text())
    assert lower(ir.load(graphs["int8"] / "model.onnx")) == manifest["precision"]["quantized_nodes"] == 16
    ids = np.array([list(range(3, 3000, 47))])  # 64 tokens
    args = (ids, np.ones_like(ids), np.arange(ids.shape[1])[None])
    # the CPU provider's lowering (on a GPU machine OrtBackend would take the CUDA provider, which keeps Q/DQ)
    backend, fp32 = OrtBackend(graphs["int8"] / "model.onnx", device="cpu"), OrtBackend(e32 / "model.onnx", device="cpu")
    integer = backend.forward(*args, backend.new_cache(1))[0]
    ref = fp32.forward(*args, fp32.new_cache(1))[0]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = OrtBackend(graphs["int8"] / "model.onnx", device="cpu")  # its feeding, over the graph as built
    plain.session = ort.InferenceSession(str(graphs["int8"] / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    dequantized = plain.forward(*args, plain.new_cache(1))[0]

    def error(x):
        return np.linalg.norm(x - ref) / np.linalg.norm(ref)

    assert error(integer) < 1.1 * error(dequantized), (error(integer), error(dequantized))  # 0.0296 vs 0.0300
    assert np.linalg.norm(integer - dequantized) / np.linalg.norm(dequantized) < 0.05  # 0.018


def test_int8_integer_gemms_choose_the_qdq_graphs_tokens(graphs):
    """The shipped model's int8 build with this CPU's integer GEMM form picks the tokens the Q/DQ graph as written
    picks (its weights dequantized: the `dequantize` form), along the Q/DQ graph's own greedy continuation: the
    integer product is exact where the Q/DQ graph rounds each product to fp16, so they may differ only where
    the Q/DQ graph's top two logits are that close."""
    from transformers import PreTrainedTokenizerFast

    from trtglm.runtime.backends import OrtBackend
    from trtglm.runtime.generate import generate
    from trtglm.runtime.integer_gemm import select_form

    tok = PreTrainedTokenizerFast.from_pretrained(MODEL)
    lowered = OrtBackend(graphs["int8"] / "model.onnx", device="cpu")
    assert lowered.int8_gemm.startswith(select_form()[0])
    qdq = OrtBackend(graphs["int8"] / "model.onnx", device="cpu", int8_gemm="dequantize")
    assert qdq.int8_gemm.startswith("dequantize")
    positions, differ = 0, 0
    for text in ("In the beginning", "And the LORD said unto Moses,", "Blessed are the"):
        prompt = tok.encode(text)
        ids = np.array([prompt + generate(qdq, [prompt], max_new_tokens=32).tokens[0]])
        args = (ids, np.ones_like(ids), np.arange(ids.shape[1])[None])
        a = lowered.forward(*args, lowered.new_cache(1))[0][0, len(prompt) - 1:]
        b = qdq.forward(*args, qdq.new_cache(1))[0][0, len(prompt) - 1:]
        for row_a, row_b in zip(a, b):
            positions += 1
            if row_a.argmax() != row_b.argmax():  # the two forms' logits differ by about 2% (fp16 rounding)
                differ += 1
                assert row_b.max() - row_b[row_a.argmax()] < 0.02 * np.abs(row_b).max(), "not a near tie"
    assert differ <= positions // 20, (differ, positions)


def test_logits_dtype_is_configurable(e32, cache, tmp_path):
    m = build(e32, tmp_path / "b", onnx_only=True, cache_dir=cache,
              overrides={"precision": {"dtype": "fp16", "logits_dtype": "fp16"}, **CALIB, **EVERY_POSITION})
    assert _io_types(_model(tmp_path / "b"))["logits"] == TensorProto.FLOAT16
    assert {s["name"]: s["dtype"] for s in m["io"]["outputs"]}["logits"] == "float16"
    r = evaluate(tmp_path / "b", e32, samples=2, seq_len=64, backend="ort")
    assert r["gate"]["passed"], r


@pytest.mark.parametrize("family", ["glm", "chatglm"])
def test_every_family_quantizes(checkpoints, family, tmp_path):
    """The other generations' graphs (glm: no post-norms; chatglm: fused query_key_value in the checkpoint) go
    through every mode; random weights, so the check is closeness of the logits to the fp32 export."""
    import shutil

    from models import add_tokenizer
    from trtglm.runtime.backends import OrtBackend

    shutil.copytree(checkpoints[family], tmp_path / "ckpt")
    add_tokenizer(tmp_path / "ckpt")
    export(str(tmp_path / "ckpt"), tmp_path / "e", validate=False)
    ids = np.array([[5, 17, 100, 42, 7, 99, 3, 150]])
    args = (ids, np.ones_like(ids), np.arange(8)[None])

    def logits(path):
        b = OrtBackend(path)
        return b.forward(*args, b.new_cache(1))[0][0].astype(np.float64)

    ref = logits(tmp_path / "e" / "model.onnx")
    # mean logits cosine over positions; random weights quantize worse than trained ones (int4 of N(0, 0.2)
    # weights in blocks of 32 measured 0.92), and a wrong scale or layout gives about 0
    for dtype, floor in (("fp16", 0.9999), ("int8", 0.99), ("fp8", 0.98), ("int4", 0.85)):
        m = build(tmp_path / "e", tmp_path / dtype, onnx_only=True, cache_dir=tmp_path / "cache",
                  overrides={"precision": {"dtype": dtype, "quantization": {"block_size": 32}},
                             "calibration": {"samples": 8, "seq_len": 32}, **EVERY_POSITION})
        got = logits(tmp_path / dtype / "model.onnx")
        cosine = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert cosine.mean() > floor, (dtype, cosine)
        if dtype != "fp16":
            per_layer = 4  # qkv (merged by fusion, or stored fused by chatglm), o, gate_up, down
            assert m["precision"]["quantized_nodes"] == 2 * per_layer and len(m["precision"]["kept_half"]) == 1


def test_fp16_without_a_tokenizer_says_the_range_check_was_skipped(exports, tmp_path):
    m = build(exports["glm4"], tmp_path / "b", onnx_only=True, overrides={"precision": {"dtype": "fp16"}})
    assert m["calibration"] is None and "no tokenizer.json" in m["precision"]["range_check"]
    assert _io_types(_model(tmp_path / "b"))["past_key_values.0.key"] == TensorProto.FLOAT16
    with pytest.raises(TrtglmError, match="no tokenizer.json"):  # int8 cannot go without calibration
        build(exports["glm4"], tmp_path / "c", onnx_only=True, overrides={"precision": {"dtype": "int8"}})


def test_unfused_norm_reductions_and_softmax_stay_fp32(e32, cache, tmp_path):
    """With fusion off the graph keeps its primitive norms and attention: their reductions and the softmax are
    the recipe's default fp32 ops, the rest is fp16, and the result stays within the fp16 goal."""
    build(e32, tmp_path / "b", onnx_only=True, cache_dir=cache, fusions=frozenset(),
          overrides={"precision": {"dtype": "fp16"}, **CALIB, **EVERY_POSITION})
    m = _model(tmp_path / "b")
    types = _float_types(m)
    for node in m.graph.node:
        if node.op_type in ("ReduceMean", "Softmax"):
            assert types[node.input[0]] == types[node.output[0]] == TensorProto.FLOAT, node.name
        if node.op_type == "MatMul" and node.input[1] in _inits(m):
            assert types[node.output[0]] == TensorProto.FLOAT16, node.name
    r = evaluate(tmp_path / "b", e32, samples=4, seq_len=128, backend="ort")
    assert r["perplexity_delta"] <= GOALS["fp16"] and r["gate"]["passed"], r


def test_conversion_that_cannot_fit_in_memory_fails_before_any_work(e32, tmp_path, monkeypatch):
    import trtglm.core.memory

    monkeypatch.setattr(trtglm.core.memory, "available_memory", lambda: 1 << 20)
    with pytest.raises(UsageError, match=r"converting this fp32 graph to int8 needs about .* GiB of memory"):
        build(e32, tmp_path / "b", onnx_only=True, overrides={"precision": {"dtype": "int8"}})
    assert not (tmp_path / "b").exists()


def test_half_rounding_is_onnx_runtimes_one_slice_at_a_time(monkeypatch):
    """The converter's fp32 -> fp16 weight rounding, replaced by one that holds a slice at a time: the same bits
    as ONNX Runtime's own, for raw and float_data tensors, whatever the slice boundaries."""
    import copy

    from onnx import numpy_helper
    from onnxruntime.transformers.float16 import (
        convert_np_to_float16,
        convert_tensor_float_to_float16,
        make_value_info_from_tensor,
    )

    import trtglm.precision.half as half

    monkeypatch.setattr(half, "SLICE", 7)
    edges = [0.0, -0.0, 1e-9, -1e-9, 5.96e-8, 3e-8, -3e-8, 6e-8, 7e4, -7e4, 65504, 65520, np.inf, -np.inf, np.nan,
             1.5, -2.25, 1e30, -1e30, 6.1e-5]
    x = np.concatenate([np.array(edges, np.float32), np.random.default_rng(0).normal(0, 1e3, 101).astype(np.float32)])
    np.testing.assert_array_equal(half.to_float16(x).view(np.uint16), convert_np_to_float16(x).view(np.uint16))
    raw = numpy_helper.from_array(x.reshape(11, 11), "w")
    listed = onnx.helper.make_tensor("v", onnx.TensorProto.FLOAT, [121], x.tolist())
    for tensor in (raw, listed):
        ours, theirs = half._tensor_to_float16(copy.deepcopy(tensor)), convert_tensor_float_to_float16(tensor)
        assert ours == theirs
        assert half._value_info_of(ours) == make_value_info_from_tensor(theirs)
