"""Exported graphs against transformers, computed here (not by the export's own validation)."""

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from trtglm.core.files import sha256
from trtglm.export.exporter import export
from trtglm.export.validate import Steps, run_steps
from trtglm.model.checkpoint import read_header
from trtglm.runtime.backends import OrtBackend

FAMILIES = ["glm", "glm4", "chatglm"]


def hf_logits(model, steps: Steps, dtype=torch.float32):
    from transformers import DynamicCache

    model = model.to(dtype)
    model.config._attn_implementation = "eager"
    cache, out = DynamicCache(config=model.config), []
    with torch.inference_mode():
        for ids, mask, pos in zip(steps.input_ids, steps.attention_mask, steps.position_ids):
            r = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      position_ids=torch.from_numpy(pos), cache=cache)
            out.append(r.logits.float().numpy())
    model.to(torch.float32)
    return out


def max_diff(ref, got, steps):
    return max(float(np.abs(r[steps.real(i)] - g[steps.real(i)]).max()) for i, (r, g) in enumerate(zip(ref, got)))


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_matches_transformers_prefill_decode_padded_batch(family, models, exports):
    steps = Steps.random(vocab=160, batch=3, prefill=7, decode=3, pad=3, seed=42)
    ref = hf_logits(models[family], steps)
    got = run_steps(OrtBackend(exports[family] / "model.onnx"), steps)
    assert max_diff(ref, got, steps) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_gives_the_unpadded_logits(family, exports):
    dec = OrtBackend(exports[family] / "model.onnx")
    rng = np.random.default_rng(3)
    short = rng.integers(0, 160, (1, 4))
    alone, _ = dec.forward(short, np.ones((1, 4), np.int64), np.arange(4)[None], dec.new_cache(1))
    ids = np.concatenate([np.zeros((1, 3), np.int64), short], axis=1)
    ids = np.concatenate([ids, rng.integers(0, 160, (1, 7))])
    mask = np.ones((2, 7), np.int64)
    mask[0, :3] = 0
    pos = np.clip(mask.cumsum(1) - 1, 0, None)
    batched, _ = dec.forward(ids, mask, pos, dec.new_cache(2))
    np.testing.assert_allclose(batched[0, 3:], alone[0], atol=1e-5)


def test_chatglm_layout_gives_the_glm_logits(exports):
    steps = Steps.random(vocab=160, seed=7)
    a = run_steps(OrtBackend(exports["glm"] / "model.onnx"), steps)
    b = run_steps(OrtBackend(exports["chatglm"] / "model.onnx"), steps)
    assert max_diff(a, b, steps) < 1e-5


def test_fp16_matches_transformers(models, checkpoints, tmp_path):
    """The fp16 graph against the exact value of the fp16 model (its rounded weights, computed in fp32):
    within 1e-2, same argmax wherever the reference's top-2 margin exceeds that noise."""
    export(str(checkpoints["glm4"]), tmp_path / "e", dtype="fp16")
    steps = Steps.random(vocab=160, batch=3, prefill=7, decode=2, pad=2, seed=5)
    rounded = copy.deepcopy(models["glm4"]).half().float()
    ref = hf_logits(rounded, steps)
    # The graph's math as the CPU provider computes it (fp16 storage, fp32 arithmetic in its kernels); the CUDA
    # provider's fp16 arithmetic lands further off (H100: 0.016), as the GPU runtimes do.
    dec = OrtBackend(tmp_path / "e" / "model.onnx", device="cpu")
    got = run_steps(dec, steps)
    assert dec.past[0].type == "tensor(float16)"
    assert max_diff(ref, got, steps) < 1e-2
    decided = 0
    for i, (r, g) in enumerate(zip(ref, got)):
        r, g = r[steps.real(i)], g[steps.real(i)]
        top2 = np.sort(r, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2e-2
        decided += int(clear.sum())
        assert (r[clear].argmax(-1) == g[clear].argmax(-1)).all()
    assert decided >= 0.8 * sum(int(steps.real(i).sum()) for i in range(len(ref)))


def test_bf16_exports_but_cannot_be_checked_on_ort_cpu(checkpoints, tmp_path):
    meta = export(str(checkpoints["glm"]), tmp_path / "e", dtype="bf16")
    assert meta["validation"]["status"] == "skipped" and "bf16" in meta["validation"]["reason"]
    onnx.checker.check_model(str(tmp_path / "e" / "model.onnx"))
    model = onnx.load(tmp_path / "e" / "model.onnx", load_external_data=False)
    weights = {i.name: i.data_type for i in model.graph.initializer}
    assert weights["model.layers.0.self_attn.q_proj.weight"] == onnx.TensorProto.BFLOAT16


@pytest.mark.parametrize("opset", [18, 24])
def test_other_opsets_validate(checkpoints, tmp_path, opset):
    meta = export(str(checkpoints["glm4"]), tmp_path / "e", opset=opset)
    assert meta["validation"]["status"] == "passed"
    assert onnx.load(tmp_path / "e" / "model.onnx", load_external_data=False).opset_import[0].version == opset


def test_sharded_checkpoint_with_index(checkpoints, exports):
    assert (checkpoints["glm4-sharded"] / "model.safetensors.index.json").is_file()
    assert len(list(checkpoints["glm4-sharded"].glob("*.safetensors"))) > 1
    steps = Steps.random(vocab=160)
    a = run_steps(OrtBackend(exports["glm4"] / "model.onnx"), steps)
    b = run_steps(OrtBackend(exports["glm4-sharded"] / "model.onnx"), steps)
    assert max_diff(a, b, steps) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_initializers_keep_checkpoint_names_in_external_data(family, checkpoints, exports):
    model = onnx.load(exports[family] / "model.onnx", load_external_data=False)
    names = set(read_header(checkpoints[family] / "model.safetensors"))
    names = {n for n in names if not n.endswith("inv_freq")}
    weights = {i.name for i in model.graph.initializer if not i.name.startswith("const_")}
    assert weights == names
    inline = [i.name for i in model.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
    assert all(".weight" not in n or "norm" in n for n in inline)  # only norms and biases are this small
    assert not any(n.metadata_props for n in model.graph.node)
    assert (exports[family] / "model.onnx").stat().st_size < 200_000
    onnx.checker.check_model(str(exports[family] / "model.onnx"))


def test_io_contract_and_export_json(checkpoints, exports):
    meta = json.loads((exports["glm4"] / "export.json").read_text())
    assert meta["family"] == "glm4" and meta["dtype"] == "fp32" and meta["opset"] == 23
    assert meta["validation"]["status"] == "passed" and meta["validation"]["max_abs_diff"] < 1e-4
    assert meta["source"]["sha256"]["model.safetensors"] == sha256(
        checkpoints["glm4"] / "model.safetensors")
    assert {"torch", "transformers", "onnx", "onnx-ir"} <= set(meta["tools"])
    model = onnx.load(exports["glm4"] / "model.onnx", load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert dims["present.0.key"] == ["batch", 2, "total_sequence", 16]
    assert dims["logits"] == ["batch", "sequence", 160]
    assert [s["name"] for s in meta["io"]["inputs"]] == [i.name for i in model.graph.input]
    assert (exports["glm4"] / "tokenizer_config.json").is_file()
    assert (exports["glm4"] / "generation_config.json").is_file()
    assert meta["files"]["sha256"]["model.onnx"]
