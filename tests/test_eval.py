"""`trtglm eval` on the shipped model: fp16 passes the accuracy gate, a deliberately broken model fails it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models import EVERY_POSITION  # perplexity needs every position
from trtglm.core.errors import TrtglmError
from trtglm.engine.build import build
from trtglm.export.exporter import export
from trtglm.runtime.evaluate import GateFailed, evaluate

MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-glm4"
EVAL = Path(__file__).resolve().parent.parent / "trtglm" / "data" / "eval.jsonl"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    export(str(MODEL), root / "e32", validate=False)
    export(str(MODEL), root / "e16", dtype="fp16", validate=False)
    build(root / "e16", root / "b16", onnx_only=True, overrides=EVERY_POSITION)
    return root


def test_fp16_meets_the_fp16_goal(shipped):
    r = evaluate(shipped / "b16", shipped / "e32", EVAL, samples=8, seq_len=128)
    assert r["tokens"] == 8 * 128
    assert abs(r["perplexity_delta"]) <= 0.005 and r["next_token_agreement"] >= 0.98 and r["gate"]["passed"]
    assert 1 < r["reference_perplexity"] < 100  # a trained model on held-out text


def test_a_broken_model_fails_the_gate(shipped, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "broken"
    shutil.copytree(MODEL, ckpt)
    weights = load_file(ckpt / "model.safetensors")
    weights["model.layers.1.post_attention_layernorm.weight"] *= 100  # scales multiplied by 100
    save_file(weights, ckpt / "model.safetensors")
    export(str(ckpt), tmp_path / "e", dtype="fp16", validate=False)
    build(tmp_path / "e", tmp_path / "b", onnx_only=True, overrides=EVERY_POSITION)
    r = evaluate(tmp_path / "b", shipped / "e32", EVAL, samples=4, seq_len=128)
    assert not r["gate"]["passed"] and r["perplexity_delta"] > 0.02  # measured +4%: the post-MLP norm absorbs much of it
    cmd = [sys.executable, "-m", "trtglm", "eval", str(tmp_path / "b"), "--reference", str(shipped / "e32"),
           "--data", str(EVAL), "--samples", "4", "--seq-len", "128"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == GateFailed.exit_code and "accuracy gate failed: perplexity +" in p.stderr
    p = subprocess.run([*cmd, "--json"], capture_output=True, text=True)
    assert json.loads(p.stdout)["gate"]["passed"] is False


def test_eval_input_errors(shipped, tmp_path):
    from trtglm.core.errors import UsageError
    from trtglm.engine.build import build

    with pytest.raises(UsageError, match="e16: accuracy is measured against an fp32 export, and this is not one"):
        evaluate(shipped / "b16", shipped / "e16", EVAL)
    with pytest.raises(UsageError, match="e16: accuracy is measured against an fp32 export"):  # the gate in build
        build(shipped / "e32", tmp_path / "gated", onnx_only=True, reference=shipped / "e16",
              overrides={"precision": {"dtype": "fp16"}, "accuracy": {"gate": True}})
    assert not (tmp_path / "gated").exists()
    with pytest.raises(TrtglmError, match="no such data file"):
        evaluate(shipped / "b16", shipped / "e32", tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "In the beginning"}\n{"nope": 1}\n')
    with pytest.raises(TrtglmError, match=r"bad.jsonl:2: expected a JSON object"):
        evaluate(shipped / "b16", shipped / "e32", bad)
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "In the beginning"}\n')
    with pytest.raises(TrtglmError, match="fewer than --seq-len 256"):
        evaluate(shipped / "b16", shipped / "e32", short)
