"""The shipped model: a valid GLM-4 checkpoint in every sense, and better than a unigram model."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL, DATA = ROOT / "models" / "tiny-glm4", ROOT / "trtglm" / "data"


def test_calibration_data_matches_its_readme():
    import hashlib

    readme = (DATA / "README.md").read_text()
    total = 0
    for name in ("calibration.jsonl", "eval.jsonl"):
        data = (DATA / name).read_bytes()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() in readme
        assert all(json.loads(line)["text"] for line in data.decode().splitlines())
    assert total < 2_200_000


def test_loads_with_transformers_and_generates_like_trtglm(tmp_path):
    from transformers import Glm4ForCausalLM, PreTrainedTokenizerFast

    from trtglm.engine.build import build
    from trtglm.export.exporter import export
    from trtglm.runtime.backends import OrtBackend
    from trtglm.runtime.generate import generate

    model = Glm4ForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(MODEL)
    meta = export(str(MODEL), tmp_path / "e")  # validated against transformers inside
    assert meta["family"] == "glm4" and meta["validation"]["status"] == "passed"
    build(tmp_path / "e", tmp_path / "b", onnx_only=True)
    ids = tok.encode("In the beginning")
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    assert generate(OrtBackend.from_build(tmp_path / "b"), [ids], max_new_tokens=20).tokens[0] == ref
    assert "[gMASK]<sop><|user|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_held_out_perplexity_beats_a_unigram_model():
    from transformers import Glm4ForCausalLM, PreTrainedTokenizerFast

    model = Glm4ForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(MODEL)
    texts = [json.loads(line)["text"] for line in (DATA / "eval.jsonl").read_text().splitlines()[:8]]
    calib = [json.loads(line)["text"] for line in (DATA / "calibration.jsonl").read_text().splitlines()]
    counts = np.bincount(np.concatenate([tok.encode(t) for t in calib]), minlength=len(tok)) + 1.0
    nll, n, uni = 0.0, 0, 0.0
    with torch.inference_mode():
        for t in texts:
            ids = torch.tensor([tok.encode(t)[:257]])
            logits = model(input_ids=ids[:, :-1]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            uni -= float(np.log(counts[ids[0, 1:].numpy()] / counts.sum()).sum())
            n += ids.shape[1] - 1
    ppl, unigram = math.exp(nll / n), math.exp(uni / n)
    assert ppl < 0.5 * unigram, (ppl, unigram)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"])
def test_shipped_files(name):
    assert (MODEL / name).is_file()
    assert sum(f.stat().st_size for f in MODEL.iterdir()) < 11_000_000
