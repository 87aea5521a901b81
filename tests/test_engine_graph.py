"""engine.onnx (engine_graph.py): every Attention decomposed for Myelin computes what model.onnx computes
(ONNX Runtime, prefill + decode of a left-padded batch), and a one-profile engine built from it has fewer
kernels than one built from the Attention op, with the fused attention kernel still there."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from trtglm.engine.build import build
from trtglm.engine.engine_graph import attention_form, write_engine_graph
from trtglm.export.exporter import export
from trtglm.export.validate import Steps, run_steps
from trtglm.runtime.backends import OrtBackend


def max_diff(a_path, b_path):
    """Largest logits difference over the real positions of a left-padded prefill and 3 decode steps."""
    steps = Steps.random(vocab=160, batch=3, prefill=7, decode=3, pad=3, seed=11)
    a, b = (run_steps(OrtBackend(p, optimize=False), steps) for p in (a_path, b_path))
    return max(float(np.abs(x - y)[steps.real(i)[:, -x.shape[1]:]].max()) for i, (x, y) in enumerate(zip(a, b)))


VARIANTS = {"dynamic": {}, "static": {"kv_cache": "static", "max_seq_len": 48}, "last logits": {"logits": "last"}}


@pytest.mark.parametrize("family", ["glm4", "chatglm"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", ["decomposed", "grouped"])
def test_written_out_attention_computes_what_the_attention_op_does(family, variant, form, exports, tmp_path):
    build(exports[family], tmp_path / "b", onnx_only=True, overrides={"shapes": VARIANTS[variant]})
    report = write_engine_graph(tmp_path / "b" / "model.onnx", tmp_path / "b" / "engine.onnx", form)
    assert report["decomposed"] == report["attention_ops"] == 2 and report["kept"] == 0
    graph = onnx.load(tmp_path / "b" / "engine.onnx", load_external_data=False).graph
    assert "Attention" not in {n.op_type for n in graph.node} and any(n.op_type == "Softmax" for n in graph.node)
    producer = {out: n.op_type for n in graph.node for out in n.output}
    tiled = [producer.get(n.input[0]) for n in graph.node if n.op_type == "Tile"]
    # decomposed: per layer, K and V stacked (Concat -> Unsqueeze) and repeated once; grouped: only the mask rows
    assert tiled == ["Unsqueeze", "Unsqueeze"] if form == "decomposed" else tiled == ["Where", "Where"]
    assert max_diff(tmp_path / "b" / "model.onnx", tmp_path / "b" / "engine.onnx") < 1e-5
    # the weights are model.onnx's: no second data file
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.endswith(".data")) == ["model.onnx.data"]


def test_decomposed_attention_in_fp16(checkpoints, tmp_path):
    export(str(checkpoints["glm4"]), tmp_path / "e", dtype="fp16", validate=False)
    build(tmp_path / "e", tmp_path / "b", onnx_only=True)
    write_engine_graph(tmp_path / "b" / "model.onnx", tmp_path / "b" / "engine.onnx")
    fp16_noise = max_diff(tmp_path / "e" / "model.onnx", tmp_path / "b" / "model.onnx")  # fusion's own fp16 rounding
    assert max_diff(tmp_path / "b" / "model.onnx", tmp_path / "b" / "engine.onnx") <= max(fp16_noise, 2e-3)


def _attention_graph(path, mask=None, **attributes):
    """Attention(q, k, v[, mask]) with q passed through an Identity whose output declares no shape, as after the
    precision stage's rewrites; `mask`: the boolean mask's shape."""
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 4, 3, 8])
    inputs = [q, *(helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 5, 8]) for n in ("k", "v"))]
    if mask:
        inputs.append(helper.make_tensor_value_info("m", TensorProto.BOOL, mask))
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 4, 3, 8])
    nodes = [helper.make_node("Identity", ["q"], ["q1"]),
             helper.make_node("Attention", ["q1", "k", "v", *(["m"] if mask else [])], ["o"], **attributes)]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, [out]),
                              opset_imports=[helper.make_opsetid("", 23)], ir_version=11)
    onnx.save(model, path)
    return path


def _assert_same_outputs(a_path, b_path, mask=None, seed=0):
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    feeds = {"q": rng.standard_normal((1, 4, 3, 8), np.float32),
             **{n: rng.standard_normal((1, 2, 5, 8), np.float32) for n in ("k", "v")}}
    if mask:
        feeds["m"] = rng.random(mask) < 0.7
        feeds["m"][..., 0] = True  # every row sees a key
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for p in (a_path, b_path))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_decomposition_without_a_mask_and_its_refusals(tmp_path):
    plain = _attention_graph(tmp_path / "plain.onnx", scale=0.3)
    assert write_engine_graph(plain, tmp_path / "plain_engine.onnx")["decomposed"] == 1
    _assert_same_outputs(plain, tmp_path / "plain_engine.onnx")
    # attributes whose meaning the decomposition does not carry stay an Attention op
    for attributes in ({"is_causal": 1}, {"softcap": 30.0}):
        kept = write_engine_graph(_attention_graph(tmp_path / "x.onnx", **attributes), tmp_path / "x_engine.onnx")
        assert kept["decomposed"] == 0 and kept["kept"] == 1
        assert f"Attention attributes ['{next(iter(attributes))}'] are not decomposed" in kept["why_kept"]


def test_grouped_needs_a_mask_shared_by_the_heads(tmp_path):
    per_head = (1, 4, 3, 5)  # one mask per head
    path = _attention_graph(tmp_path / "m.onnx", mask=per_head)
    grouped = write_engine_graph(path, tmp_path / "g.onnx", "grouped")
    assert grouped["kept"] == 1 and "shared by the heads" in grouped["why_kept"]
    assert write_engine_graph(path, tmp_path / "d.onnx", "decomposed")["decomposed"] == 1
    _assert_same_outputs(path, tmp_path / "d.onnx", mask=per_head, seed=1)


def test_auto_decomposes_for_one_profile_only():
    assert attention_form("auto", 1) == "decomposed" and attention_form("auto", 2) == "layer"
    assert attention_form("layer", 1) == "layer" and attention_form("decomposed", 2) == "decomposed"


def test_one_profile_engine_kernels_by_attention_form(checkpoints, tmp_path):
    export(str(checkpoints["glm4"]), tmp_path / "e", dtype="fp16", validate=False, max_seq_len=64)
    shapes = {"max_input_len": 16, "max_seq_len": 64}
    built = {}
    for form in ("auto", "layer", "grouped"):
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
    grouped, grouped_layers = built["grouped"]
    assert grouped["engine_graph"]["attention"] == "grouped"
    # kernels that append to the cache (Conc) and repeat (Repl): K/V copied to every query head, not when grouped
    repeats = {form: [k["name"] for k in built[form][1]["engine_layers"] if "Conc" in k["name"] and "Repl" in k["name"]]
               for form in built}
    assert repeats["auto"] and repeats["layer"] and not repeats["grouped"]
    assert auto["engine"]["kernels"] < grouped["engine"]["kernels"] < layer["engine"]["kernels"]
    assert auto["files"]["sha256"]["engine.onnx"] and auto["files"]["sha256"]["model.onnx"]
    split = build(tmp_path / "e", tmp_path / "split", overrides={"shapes": shapes | {"profiles": "split"}},
                  use_cache=False)
    assert split["engine_graph"]["attention"] == "layer"  # its decode kernel reads the KV heads unrepeated
