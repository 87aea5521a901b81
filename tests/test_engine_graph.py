"""engine.onnx (engine_graph.py): every Attention decomposed for Myelin computes what model.onnx computes
(ONNX Runtime, prefill + decode of a left-padded batch), and a one-profile engine built from it has fewer
kernels than one built from the Attention op, with the fused attention kernel still there."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from trtglm.backends import OrtBackend
from trtglm.build import build
from trtglm.engine_graph import attention_form, write_engine_graph
from trtglm.export import export
from trtglm.validate import Steps, run_steps

def max_diff(a_path, b_path):
    """Largest logits difference over the real positions of a left-padded prefill and 3 decode steps."""
    steps = Steps.random(vocab=160, batch=3, prefill=7, decode=3, pad=3, seed=11)
    a, b = (run_steps(OrtBackend(p, optimize=False), steps) for p in (a_path, b_path))
    return max(float(np.abs(x - y)[steps.real(i)[:, -x.shape[1]:]].max()) for i, (x, y) in enumerate(zip(a, b)))


VARIANTS = {"dynamic": {}, "static": {"kv_cache": "static", "max_seq_len": 48}, "last logits": {"logits": "last"}}


@pytest.mark.parametrize("family", ["glm4", "chatglm"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_decomposed_attention_computes_what_the_attention_op_does(family, variant, exports, tmp_path):
    build(exports[family], tmp_path / "b", onnx_only=True, overrides={"shapes": VARIANTS[variant]})
    report = write_engine_graph(tmp_path / "b" / "model.onnx", tmp_path / "b" / "engine.onnx")
    assert report["decomposed"] == report["attention_ops"] == 2 and report["kept"] == 0
    ops = {n.op_type for n in onnx.load(tmp_path / "b" / "engine.onnx", load_external_data=False).graph.node}
    assert "Attention" not in ops and {"Softmax", "Tile"} <= ops  # GQA: K and V repeated once, together
    assert max_diff(tmp_path / "b" / "model.onnx", tmp_path / "b" / "engine.onnx") < 1e-5
    # the weights are model.onnx's: no second data file
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.endswith(".data")) == ["model.onnx.data"]


def test_decomposed_attention_in_fp16(checkpoints, tmp_path):
    export(str(checkpoints["glm4"]), tmp_path / "e", dtype="fp16", validate=False)
    build(tmp_path / "e", tmp_path / "b", onnx_only=True)
    write_engine_graph(tmp_path / "b" / "model.onnx", tmp_path / "b" / "engine.onnx")
    fp16_noise = max_diff(tmp_path / "e" / "model.onnx", tmp_path / "b" / "model.onnx")  # fusion's own fp16 rounding
    assert max_diff(tmp_path / "b" / "model.onnx", tmp_path / "b" / "engine.onnx") <= max(fp16_noise, 2e-3)


def _attention_graph(path, **attributes):
    """q passes an Identity whose output declares no shape, as after the precision stage's rewrites."""
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 4, 3, 8])
    kv = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 5, 8]) for n in ("k", "v")]
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 4, 3, 8])
    nodes = [helper.make_node("Identity", ["q"], ["q1"]),
             helper.make_node("Attention", ["q1", "k", "v"], ["o"], **attributes)]
    model = helper.make_model(helper.make_graph(nodes, "g", [q, *kv], [out]), opset_imports=[helper.make_opsetid("", 23)], ir_version=11)
    onnx.save(model, path)
    return path


def test_decomposition_without_a_mask_and_its_refusals(tmp_path):
    import onnxruntime as ort

    plain = _attention_graph(tmp_path / "plain.onnx", scale=0.3)
    assert write_engine_graph(plain, tmp_path / "plain_engine.onnx")["decomposed"] == 1
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((1, 4, 3, 8), np.float32),
             **{n: rng.standard_normal((1, 2, 5, 8), np.float32) for n in ("k", "v")}}
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for p in (plain, tmp_path / "plain_engine.onnx"))
    np.testing.assert_allclose(a, b, atol=1e-5)
    # attributes whose meaning the decomposition does not carry stay an Attention op
    for attributes in ({"is_causal": 1}, {"softcap": 30.0}):
        kept = write_engine_graph(_attention_graph(tmp_path / "x.onnx", **attributes), tmp_path / "x_engine.onnx")
        assert kept["decomposed"] == 0 and kept["kept"] == 1
        assert f"Attention attributes ['{next(iter(attributes))}'] are not decomposed" in kept["why_kept"]


def test_auto_decomposes_for_one_profile_only():
    assert attention_form("auto", 1) == "decomposed" and attention_form("auto", 2) == "layer"
    assert attention_form("layer", 1) == "layer" and attention_form("decomposed", 2) == "decomposed"


def test_one_profile_engine_has_fewer_kernels_decomposed(checkpoints, tmp_path):
    export(str(checkpoints["glm4"]), tmp_path / "e", dtype="fp16", validate=False, max_seq_len=64)
    shapes = {"max_input_len": 16, "max_seq_len": 64}
    built = {}
    for form in ("auto", "layer"):
        m = build(tmp_path / "e", tmp_path / form, overrides={"shapes": shapes, "builder": {"attention": form}},
                  use_cache=False)
        layers = json.loads((tmp_path / form / "layers.json").read_text())
        built[form] = (m, layers)
        assert any("mha" in layer["name"] for layer in layers["engine_layers"])  # the fused attention kernel
    (auto, auto_layers), (layer, layer_layers) = built["auto"], built["layer"]
    assert auto["engine_graph"] == {"file": "engine.onnx", "attention": "decomposed", "decomposed": 2,
                                    "attention_ops": 2, "kept": 0}
    assert "ATTENTION_OUTPUT" not in auto_layers["network_layer_types"]
    assert layer["engine_graph"] == {"file": "model.onnx", "attention": "layer"}
    assert layer_layers["network_layer_types"]["ATTENTION_OUTPUT"] == 2 and not (tmp_path / "layer" / "engine.onnx").exists()
    assert auto["engine"]["kernels"] < layer["engine"]["kernels"]
    assert auto["files"]["sha256"]["engine.onnx"] and auto["files"]["sha256"]["model.onnx"]
    split = build(tmp_path / "e", tmp_path / "split", overrides={"shapes": shapes | {"profiles": "split"}},
                  use_cache=False)
    assert split["engine_graph"]["attention"] == "layer"  # its decode kernel reads the KV heads unrepeated
