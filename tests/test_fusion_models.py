"""Fusion on whole exported models of every family: exact counts, logits equal to the unfused graph
(prefill, decode, left-padded batch), strictness, idempotence, and the TensorRT-RTX build."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from models import EVERY_POSITION
from trtglm.core.errors import TrtglmError
from trtglm.engine.build import build
from trtglm.export.exporter import export
from trtglm.export.validate import Steps, run_steps
from trtglm.fusion import DEFAULT_FUSIONS, FusionError, expected_counts, fuse
from trtglm.runtime.backends import OrtBackend

FAMILIES = ["glm", "glm4", "chatglm"]
ALL = frozenset({"rms_norm", "qkv", "rotary", "rotary_keys", "attention"})


def max_diff(a_path, b_path, atol_scale=False):
    steps = Steps.random(vocab=160, batch=3, prefill=7, decode=3, pad=3, seed=11)
    a = run_steps(OrtBackend(a_path, optimize=False), steps)
    b = run_steps(OrtBackend(b_path, optimize=False), steps)
    return max(float(np.abs(x[steps.real(i)] - y[steps.real(i)]).max()) for i, (x, y) in enumerate(zip(a, b)))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fusions", ["default", "all"])
def test_fused_model_counts_and_logits(family, fusions, exports, tmp_path):
    chosen = ALL if fusions == "all" else DEFAULT_FUSIONS
    manifest = build(exports[family], tmp_path / "b", onnx_only=True, fusions=chosen, overrides=EVERY_POSITION)
    f = manifest["fusion"]
    layers = 2
    norms = (4 if family == "glm4" else 2) * layers + 1
    keys = {} if fusions == "all" else {"rotary_keys_folded": layers}  # "all": keys rotated by RotaryEmbedding
    assert f["fused"] == {"rms_norm": norms, "rotary": layers * (2 if fusions == "all" else 1), "attention": layers,
                          "qkv": 0 if family == "chatglm" else layers, **keys}  # chatglm's checkpoint stores qkv merged
    assert f["nodes_after"] <= 0.40 * f["nodes_before"]  # the goal
    assert "Softmax" not in f["ops_after"] and "Expand" not in f["ops_after"] and "Pow" not in f["ops_after"]
    assert max_diff(exports[family] / "model.onnx", tmp_path / "b" / "model.onnx") < 1e-5
    onnx.checker.check_model(str(tmp_path / "b" / "model.onnx"), full_check=True)  # declared shapes are true


def test_fusion_is_idempotent_on_a_whole_model(exports, tmp_path):
    build(exports["glm4"], tmp_path / "b", onnx_only=True, fusions=ALL)
    model = ir.load(tmp_path / "b" / "model.onnx")
    report = fuse(model, max_positions=256, expected=expected_counts(2, True, ALL), strict=True, fusions=ALL)
    assert not any(report.rewrites.values())
    assert report.nodes_after == report.nodes_before


def test_strict_names_the_rule_and_the_reason(exports):
    model = ir.load(exports["glm"] / "model.onnx")
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    softmax.attributes["axis"] = ir.AttrInt64("axis", 3)  # same math on 4-D scores, not the pattern's form
    with pytest.raises(FusionError, match=r"1 Attention op\(s\) in the graph, expected 2; rule attention\w* refused"):
        fuse(model, max_positions=256, expected=expected_counts(2, False), strict=True)
    model = ir.load(exports["glm"] / "model.onnx")
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    softmax.attributes["axis"] = ir.AttrInt64("axis", 3)
    report = fuse(model, max_positions=256, expected=expected_counts(2, False), strict=False)
    assert report.fused["attention"] == 1


def test_fp16_fused_graph_matches_and_builds_with_tensorrt_rtx(checkpoints, tmp_path):
    from trtglm.engine.builder import build_engine

    export(str(checkpoints["glm4"]), tmp_path / "e", dtype="fp16", validate=False)
    build(tmp_path / "e", tmp_path / "b", onnx_only=True, overrides=EVERY_POSITION)
    steps_scale = max_diff(tmp_path / "e" / "model.onnx", tmp_path / "b" / "model.onnx")
    assert steps_scale < 2e-2
    engine = build_engine(tmp_path / "b" / "model.onnx", targets=("sm89",), max_input_len=32, max_seq_len=64)
    assert engine.backend == "tensorrt_rtx" and len(engine.plan) > 100_000
    assert engine.network_layer_types["ROTARY_EMBEDDING"] == 2  # queries of 2 layers (keys folded)
    assert engine.network_layer_types["ATTENTION_OUTPUT"] == 2
    names = [k["name"] for k in engine.kernels]
    assert any("mha" in n for n in names), names  # the fused attention kernel, in both profiles
    unfused = build_engine(tmp_path / "e" / "model.onnx", targets=("sm89",), max_input_len=32, max_seq_len=64)
    assert "ROTARY_EMBEDDING" not in unfused.network_layer_types


def test_tensorrt_rtx_still_fails_on_fused_key_rotation_with_fused_attention(checkpoints, tmp_path):
    """Why a dynamic cache folds its keys' rotation (rotary_keys_folded). When this starts passing the build,
    rotate them with RotaryEmbedding (rotary_keys), as the static cache does."""
    from trtglm.engine.builder import BuildError, build_engine

    export(str(checkpoints["glm4"]), tmp_path / "e", dtype="fp16", validate=False)
    build(tmp_path / "e", tmp_path / "b", onnx_only=True, fusions=ALL, overrides={"shapes": {"kv_cache": "dynamic"}})
    with pytest.raises(BuildError, match="Myelin"):
        build_engine(tmp_path / "b" / "model.onnx", targets=("sm89",), max_input_len=32, max_seq_len=64)


def test_build_cli(exports, tmp_path, capsys):
    from trtglm.cli import main

    def run(*args):
        with pytest.raises(SystemExit) as e:
            main(list(args))
        return e.value.code, *capsys.readouterr()

    try:
        main(["build", str(exports["glm"]), "-o", str(tmp_path / "b"), "--onnx-only", "--json"])
    except SystemExit as e:
        assert e.code in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["fusion"]["fused"]["attention"] == 2 and (tmp_path / "b" / "model.onnx").is_file()
    assert (tmp_path / "b" / "export.json").is_file()
    code, _, err = run("build", str(exports["glm"]), "-o", str(tmp_path / "b"), "--onnx-only")
    assert code == 1 and "already exists" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run("build", str(tmp_path / "empty"), "-o", str(tmp_path / "d"), "--onnx-only")
    assert code == 1 and "no model.onnx" in err and "Traceback" not in err
    code, _, err = run("build", str(exports["glm"]), "-o", str(tmp_path / "d"), "--onnx-only", "--fusions", "x")
    assert code == 2 and "fusion.fusions" in err and not (tmp_path / "d").exists()


def test_no_fusion_is_a_faithful_copy(exports, tmp_path):
    manifest = build(exports["glm"], tmp_path / "b", onnx_only=True, fusions=frozenset(), overrides=EVERY_POSITION)
    assert manifest["fusion"]["fused"] == {"rms_norm": 0, "rotary": 0, "attention": 0}
    assert max_diff(exports["glm"] / "model.onnx", tmp_path / "b" / "model.onnx") < 1e-6


def test_corrupt_onnx_is_one_line(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "model.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(TrtglmError, match="cannot be read as ONNX"):
        build(tmp_path / "e", tmp_path / "b", onnx_only=True, max_seq_len=64)


def test_graph_from_torch_dynamo_exporter_fuses_strictly(models, exports, tmp_path):
    """Another exporter's graph (torch.onnx dynamo, opset 18, transformers' own modules): every rule
    matches its forms, logits stay equal, and equal trtglm's own export of the same weights."""
    from models import dynamo_export

    foreign = dynamo_export(models["glm4"], tmp_path / "dynamo")
    manifest = build(foreign, tmp_path / "b", onnx_only=True, max_seq_len=256, overrides=EVERY_POSITION)
    assert manifest["fusion"]["fused"] == {"rms_norm": 9, "rotary": 2, "attention": 2, "qkv": 2,
                                           "rotary_keys_folded": 2}
    assert manifest["fusion"]["rewrites"]["rotary_strided_partial"] == 4  # torch.stack((-x2, x1)) form, q and k
    assert max_diff(foreign / "model.onnx", tmp_path / "b" / "model.onnx") < 1e-5
    assert max_diff(exports["glm4"] / "model.onnx", tmp_path / "b" / "model.onnx") < 1e-4
