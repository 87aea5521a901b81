"""glm4_moe (GLM-4.5/4.6/4.7, GLM-4.5-Air) through every stage, each against transformers' own model."""

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import pytest
import torch
from models import TINY_MOE, add_tokenizer, hf_moe_model, randomized, save_hf, save_stacked_experts
from test_export import hf_logits, max_diff
from test_runtime import hf_greedy

from trtglm.core.errors import CheckpointError, TrtglmError, UsageError
from trtglm.engine.build import build
from trtglm.export.exporter import export
from trtglm.export.validate import Steps, run_steps
from trtglm.model.config import normalize
from trtglm.precision.experts import QMAX, expert_gathers, quantize_experts
from trtglm.runtime.backends import OrtBackend
from trtglm.runtime.generate import generate

# the default: 4 groups of 2 experts, 2 groups kept, q/k norms, attention bias, untied, scaling 1.5, one shared
# expert, first layer dense; the other: one group, no q/k norms, tied embeddings, no attention bias, weights not
# normalized, two shared experts, every layer routed
VARIANTS = {
    "groups": {},
    "flat": dict(n_group=1, topk_group=1, use_qk_norm=False, tie_word_embeddings=True, attention_bias=False,
                 norm_topk_prob=False, n_shared_experts=2, first_k_dense_replace=0, routed_scaling_factor=1.0),
}


@pytest.fixture(scope="module")
def moe_models():
    return {name: hf_moe_model(seed=7 + i, **o) for i, (name, o) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="module")
def moe_exports(moe_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for name, model in moe_models.items():
        export(str(add_tokenizer(save_hf(model, root / f"{name}-ckpt"))), root / name)
        out[name] = root / name
    return out


STEPS = Steps.random(vocab=160, batch=3, prefill=7, decode=3, pad=3, seed=42)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_export_matches_transformers(variant, moe_models, moe_exports):
    ref = hf_logits(moe_models[variant], STEPS)
    got = run_steps(OrtBackend(moe_exports[variant] / "model.onnx"), STEPS)
    assert max_diff(ref, got, STEPS) < 1e-4
    meta = json.loads((moe_exports[variant] / "export.json").read_text())
    assert meta["family"] == "glm4_moe" and meta["validation"]["status"] == "passed"
    assert meta["moe"]["experts"] == 8 and meta["moe"]["top_k"] == 2
    assert meta["moe"]["active_parameters"] < meta["parameters"]


def test_the_correction_bias_changes_the_routing(moe_models):
    """The test model's correction bias chooses other experts than the scores alone: an export that dropped it
    (as one other exporter does) would fail the comparison above."""
    model = moe_models["groups"]
    unbiased = copy.deepcopy(model)
    for name, b in unbiased.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()
    assert max_diff(hf_logits(model, STEPS), hf_logits(unbiased, STEPS), STEPS) > 1e-2


def test_stacked_expert_tensors_read_as_per_expert_ones(moe_models, moe_exports, tmp_path):
    """transformers' in-memory layout (experts.gate_up_proj [E,2I,H]) and the released checkpoints' (one tensor
    per expert) give the same graph."""
    ckpt = save_stacked_experts(save_hf(moe_models["groups"], tmp_path / "ckpt"))
    export(str(ckpt), tmp_path / "e", validate=False)
    a, b = (run_steps(OrtBackend(p / "model.onnx"), STEPS) for p in (moe_exports["groups"], tmp_path / "e"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_multi_token_prediction_layers_are_skipped_and_said(moe_models, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = save_hf(moe_models["groups"], tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    mtp = {k.replace("model.layers.2.", "model.layers.3."): v.clone() for k, v in tensors.items() if "model.layers.2." in k}
    mtp |= {"model.layers.3.eh_proj.weight": torch.zeros(64, 128), "model.layers.3.enorm.weight": torch.ones(64)}
    save_file(tensors | mtp, ckpt / "model.safetensors")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 1}))
    meta = export(str(ckpt), tmp_path / "e")
    assert meta["skipped_tensors"]["count"] == len(mtp) and "multi-token-prediction" in meta["skipped_tensors"]["reason"]
    assert meta["validation"]["status"] == "passed" and meta["config"]["num_layers"] == 3
    # without the config field the same tensors are a mismatch, named
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected \d+ tensor\(s\): model.layers.3"):
        export(str(ckpt), tmp_path / "e2")


def test_fp16_export_keeps_the_router_in_fp32(moe_models, tmp_path):
    ckpt = save_hf(moe_models["groups"], tmp_path / "ckpt", dtype=torch.float16)
    meta = export(str(ckpt), tmp_path / "e", dtype="fp16")
    assert meta["validation"]["status"] == "passed"
    inits = {t.name: t.data_type for t in onnx.load(tmp_path / "e" / "model.onnx", load_external_data=False).graph.initializer}
    router = {n: t for n, t in inits.items() if ".mlp.gate." in n}
    assert len(router) == 4 and set(router.values()) == {onnx.TensorProto.FLOAT}
    assert inits["model.layers.1.mlp.experts.gate_up_proj"] == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("variant", VARIANTS)
def test_fusion_reaches_its_counts_and_computes_the_same(variant, moe_exports, tmp_path):
    m = build(moe_exports[variant], tmp_path / "b", onnx_only=True, overrides={"shapes": {"logits": "all"}})
    layers, qk = TINY_MOE["num_hidden_layers"], VARIANTS[variant].get("use_qk_norm", True)
    fused = m["fusion"]["fused"]
    assert fused["rms_norm"] == 2 * layers + 1 + 2 * layers * qk and fused["attention"] == layers
    assert fused["rotary"] == layers and fused["qkv"] == layers  # with and without attention biases
    # q/k norms sit between the key projection and its rotation: the rotation cannot be folded into the projection
    assert ("rotary_keys_folded" in m["fusion"]["fusions"]) == (not qk)
    assert max_diff(run_steps(OrtBackend(moe_exports[variant] / "model.onnx"), STEPS),
                    run_steps(OrtBackend(tmp_path / "b" / "model.onnx"), STEPS), STEPS) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_equals_transformers(variant, moe_models, moe_exports, tmp_path):
    build(moe_exports[variant], tmp_path / "b", onnx_only=True)
    prompts = [[5, 17, 99, 3, 42, 8, 150], [11, 12], [77, 1, 60, 61]]
    ours = generate(OrtBackend.from_build(tmp_path / "b"), prompts, max_new_tokens=10).tokens
    assert ours == hf_greedy(moe_models[variant], prompts, 10)


def test_bf16_build_keeps_the_router_in_fp32(moe_exports, tmp_path):
    """bf16 (not runnable on ONNX Runtime's CPU provider): the router's weights fp32, the experts bf16."""
    build(moe_exports["groups"], tmp_path / "b", onnx_only=True, overrides={"precision": {"dtype": "bf16"}})
    inits = {t.name: t.data_type for t in onnx.load(tmp_path / "b" / "model.onnx", load_external_data=False).graph.initializer}
    assert {inits[n] for n in inits if ".mlp.gate." in n} == {onnx.TensorProto.FLOAT}
    assert {inits[n] for n in inits if n.endswith(("experts.gate_up_proj", "experts.down_proj"))} == {
        onnx.TensorProto.BFLOAT16}


def test_fp16_build_keeps_the_router_in_fp32(moe_exports, tmp_path):
    # a build shorter than the export: the fp16 range check's windows fit the build's rotary tables
    m = build(moe_exports["groups"], tmp_path / "b", onnx_only=True,
              overrides={"shapes": {"logits": "all", "max_seq_len": 64}, "precision": {"dtype": "fp16"}})
    assert m["precision"]["fp32_islands"]["router_nodes"] > 0 and "range_cache" in m["precision"]
    graph = onnx.shape_inference.infer_shapes(onnx.load(tmp_path / "b" / "model.onnx", load_external_data=False)).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    assert {inits[n] for n in inits if ".mlp.gate." in n} == {onnx.TensorProto.FLOAT}
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]} | \
        {t.name: t.data_type for t in graph.initializer}
    routers = [n for n in graph.node if n.name.startswith("router/") and n.op_type == "MatMul"]
    assert len(routers) == 2 and all(types[i] == onnx.TensorProto.FLOAT for n in routers for i in n.input)
    fp32 = run_steps(OrtBackend(moe_exports["groups"] / "model.onnx"), STEPS)
    fp16 = run_steps(OrtBackend(tmp_path / "b" / "model.onnx"), STEPS)
    assert max_diff(fp32, fp16, STEPS) < 2e-2 * max(1.0, max(float(np.abs(x).max()) for x in fp32))


def _chosen_experts_per_step(build_dir, steps):
    """How many experts each MoE layer's step gathered: the TopK that chooses them, made a graph output."""
    import onnxruntime as ort

    model = onnx.load(build_dir / "model.onnx")
    ids = [n.output[1] for n in model.graph.node if n.name.startswith("experts/") and n.op_type == "TopK"]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(i) for i in ids)
    onnx.save(model, build_dir / "probe.onnx", save_as_external_data=True, location="probe.data")
    sess = ort.InferenceSession(str(build_dir / "probe.onnx"), providers=["CPUExecutionProvider"])
    batch, kv, d = steps.input_ids[0].shape[0], TINY_MOE["num_key_value_heads"], TINY_MOE["head_dim"]
    cache = {i.name: np.zeros((batch, kv, 0, d), np.float32) for i in sess.get_inputs()
             if i.name.startswith("past_key_values.")}
    counts = []
    for ids_, mask, pos in zip(steps.input_ids, steps.attention_mask, steps.position_ids):
        feeds = {"input_ids": ids_, "attention_mask": mask, "position_ids": pos, **cache}
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        counts.append([len(outs[i]) for i in ids])
        cache = {k.replace("present.", "past_key_values."): v for k, v in outs.items() if k.startswith("present.")}
    return counts


def test_a_decode_step_reads_only_the_experts_its_rows_chose(moe_exports, tmp_path):
    build(moe_exports["groups"], tmp_path / "b", onnx_only=True)
    one_row = Steps.random(vocab=160, batch=1, prefill=9, decode=2, pad=0, seed=3)
    counts = _chosen_experts_per_step(tmp_path / "b", one_row)
    # prefill: 9 tokens x top-2 reach past the 8 experts: each read once; the last layer's MLP runs for the last
    # position only (a build computes the logits of the last position, and the graph is cut to it before)
    assert counts[0] == [8, 2]
    assert counts[1:] == [[2, 2], [2, 2]]  # decode: top-2 of 8


def test_group_limited_routing_is_checked():
    base = {"model_type": "glm4_moe", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "moe_intermediate_size": 4, "n_routed_experts": 8,
            "num_experts_per_tok": 2}
    assert normalize(base | {"n_group": 4, "topk_group": 2}).moe.n_group == 4
    with pytest.raises(CheckpointError, match="do not divide into n_group 3"):
        normalize(base | {"n_group": 3})
    with pytest.raises(CheckpointError, match="num_experts_per_tok 9 exceeds n_routed_experts 8"):
        normalize(base | {"num_experts_per_tok": 9})
    with pytest.raises(CheckpointError, match="group-limited routing"):
        normalize(base | {"n_group": 4, "topk_group": 5})


def test_engine_builds_for_sm89_and_sm120(moe_exports, tmp_path):
    m = build(moe_exports["groups"], tmp_path / "b",
              overrides={"shapes": {"max_batch": 2, "max_input_len": 32, "max_seq_len": 64},
                         "precision": {"dtype": "fp16"},
                         "builder": {"targets": "sm89,sm120"}})
    assert m["stage"] == "engine" and m["targets"] == ["sm89", "sm120"]
    assert (tmp_path / "b" / "model.engine").stat().st_size > 0


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_experts_compute_their_dequantized_weights(dtype, moe_exports, tmp_path):
    """ONNX Runtime's DequantizeLinear of the stored experts (int4 packed two to a byte) gives back numpy's
    q * scale, which is within half a step of each weight."""
    model = onnx.load(moe_exports["groups"] / "model.onnx")
    originals = {g.input[0]: onnx.numpy_helper.to_array(next(t for t in model.graph.initializer
                                                            if t.name == g.input[0])) for g in expert_gathers(model)}
    assert len(originals) == 4  # two MoE layers, gate_up and down
    record = quantize_experts(model, dtype, block_size=16)
    assert record["stacked_weights"] == 4
    inits = {t.name: t for t in model.graph.initializer}
    reference = onnx.load(moe_exports["groups"] / "model.onnx")
    for name, w in originals.items():
        q = onnx.numpy_helper.to_array(inits[f"{name}_quantized"]).astype(np.float32)
        scale = onnx.numpy_helper.to_array(inits[f"{name}_scale"])
        assert np.abs(q).max() <= QMAX[dtype] and inits[f"{name}_quantized"].data_type == (
            onnx.TensorProto.INT8 if dtype == "int8" else onnx.TensorProto.INT4)
        block = w.shape[1] // scale.shape[1]
        dequantized = q * np.repeat(scale, block, axis=1)
        assert np.abs(dequantized - w).max() <= np.repeat(scale, block, axis=1).max() / 2 + 1e-6
        t = next(t for t in reference.graph.initializer if t.name == name)
        t.CopyFrom(onnx.numpy_helper.from_array(dequantized.astype(np.float32), name))
    onnx.save(model, tmp_path / "q.onnx", save_as_external_data=True, location="q.data")
    onnx.save(reference, tmp_path / "r.onnx", save_as_external_data=True, location="r.data")
    a, b = (run_steps(OrtBackend(tmp_path / f), STEPS) for f in ("q.onnx", "r.onnx"))
    assert max_diff(a, b, STEPS) < 1e-4


@pytest.fixture(scope="module")
def wide_experts(tmp_path_factory):
    """One routed layer whose experts (1.57M parameters) outweigh the rest of the model and the engine's code."""
    root = tmp_path_factory.mktemp("wide")
    model = hf_moe_model(seed=1, moe_intermediate_size=1024, num_hidden_layers=2)
    export(str(add_tokenizer(save_hf(model, root / "ckpt"))), root / "e", validate=False)
    return root / "e", 8 * 3 * 64 * 1024


def test_quantized_experts_stay_quantized_in_the_engine(wide_experts, tmp_path):
    """TensorRT-RTX keeps the experts in int8 / int4 (not dequantized at build time): the engines shrink by
    about the experts' bytes saved."""
    export_dir, experts = wide_experts
    small = {"shapes": {"max_batch": 2, "max_input_len": 32, "max_seq_len": 64}, "builder": {"targets": "sm89"},
             "calibration": {"samples": 4, "seq_len": 32}}
    sizes = {}
    for dtype in ("fp16", "int8", "int4"):
        m = build(export_dir, tmp_path / dtype, overrides={**small, "precision": {
            "dtype": dtype, "quantization": {"block_size": 32}}})
        assert dtype == "fp16" or m["precision"]["experts"]["parameters"] == experts
        graph = onnx.load(tmp_path / dtype / "model.onnx", load_external_data=False).graph
        router = [t for t in graph.initializer if ".mlp.gate." in t.name]  # not quantized: fp32 as exported
        assert len(router) == 2 and {t.data_type for t in router} == {onnx.TensorProto.FLOAT}, dtype
        sizes[dtype] = (tmp_path / dtype / "model.engine").stat().st_size
    assert sizes["fp16"] - sizes["int8"] > 0.75 * experts * 1, sizes  # 2 bytes -> 1
    assert sizes["fp16"] - sizes["int4"] > 0.75 * experts * 1.5, sizes  # 2 bytes -> 0.5 (+ a scale per 32)


@pytest.mark.parametrize("dtype", ["fp32", "int4"])
def test_staged_build_cuts_between_moe_layers(dtype, moe_exports, tmp_path):
    """One layer per stage: expert weights and routing nodes go with their layer, the stages pass one tensor, and
    the chain computes what the whole graph does (int4: each stage's experts quantized on their own, to the
    same weights and scales; the logits then differ by the fp16 rounding at the stage boundaries only, less than
    int4 itself moves them)."""
    import glob

    from models import left_padded, one_layer_per_stage
    from test_stages import PROMPTS, _initializers, assert_same_steps

    overrides = {"precision": {"dtype": dtype, "quantization": {"block_size": 16}}}
    build(moe_exports["groups"], tmp_path / "whole", onnx_only=True, overrides=overrides)
    budget = one_layer_per_stage(moe_exports["groups"], dtype)
    m = build(moe_exports["groups"], tmp_path / "staged", onnx_only=True,
              overrides={**overrides, "builder": {"max_memory": budget}})
    assert [s["layers"] for s in m["stages"]] == [[0, 1], [1, 2], [2, 3]]
    assert all([n for n in s["inputs"] if n.startswith("hidden.")] == ([f"hidden.{s['layers'][0]}"] if s["layers"][0]
                                                                       else []) for s in m["stages"])
    whole, staged = OrtBackend.from_build(tmp_path / "whole"), OrtBackend.from_build(tmp_path / "staged")
    if dtype == "fp32":
        assert_same_steps(whole, staged)
        return
    assert m["precision"]["experts"]["stacked_weights"] == 4
    a = _initializers([tmp_path / "whole" / "model.onnx"])
    b = _initializers(sorted(glob.glob(str(tmp_path / "staged" / "stages" / "*" / "model.onnx"))))
    names = [n for n in a if ".experts." in n and n.endswith(("_quantized", "_scale"))]
    assert len(names) == 8
    for name in names:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    ids, mask, pos = left_padded(PROMPTS)
    fp32 = OrtBackend(moe_exports["groups"] / "model.onnx")
    logits = {name: backend.forward(ids, mask, pos, backend.new_cache(3))[0][:, -1]
              for name, backend in (("whole", whole), ("staged", staged), ("fp32", fp32))}
    assert np.abs(logits["staged"] - logits["whole"]).max() < np.abs(logits["whole"] - logits["fp32"]).max()


SHIPPED = Path(__file__).resolve().parent.parent / "models" / "tiny-glm4-moe"
EVAL = Path(__file__).resolve().parent.parent / "trtglm" / "data" / "eval.jsonl"


@pytest.fixture(scope="module")
def shipped_moe(tmp_path_factory):
    out = tmp_path_factory.mktemp("shipped-moe") / "e32"
    meta = export(str(SHIPPED), out, max_seq_len=256)  # validated against transformers on the trained weights
    assert meta["validation"]["status"] == "passed"
    return out


def test_shipped_moe_generates_like_transformers(shipped_moe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(SHIPPED)
    prompts = [tok.encode(p) for p in ("In the beginning", "And the LORD said unto Moses,")]
    build(shipped_moe, tmp_path / "b", onnx_only=True)
    ours = generate(OrtBackend.from_build(tmp_path / "b"), prompts, max_new_tokens=16).tokens
    assert ours == hf_greedy(model, prompts, 16)
    training = json.loads((SHIPPED / "training.json").read_text())
    assert training["eval_perplexity"] < training["unigram_perplexity"] / 5


def test_shipped_moe_trained_correction_bias_changes_the_routing():
    """The aux-loss-free balancing left a bias that picks other experts than the scores alone for part of real
    text: the shipped model checks what an export that dropped it would get wrong."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trtglm.precision.calibration import read_texts

    model = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(SHIPPED).encode(read_texts(EVAL)[0])[:128]])
    chosen = {}
    hooks = [m.register_forward_hook(lambda m, a, out, i=i: chosen.__setitem__(i, out[2].sort(-1).values))
             for i, m in enumerate(x for x in model.modules() if type(x).__name__.endswith("TopkRouter"))]
    with torch.inference_mode():
        model(input_ids=ids)
        biased = dict(chosen)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    changed = np.mean([(biased[i] != chosen[i]).any(-1).float().mean().item() for i in biased])
    assert changed > 0.05, changed


@pytest.mark.parametrize("dtype", ["fp16", "int8", "fp8", "int4"])
def test_shipped_moe_meets_the_accuracy_goals(dtype, shipped_moe, tmp_path):
    """Held-out perplexity, next-token agreement and logits cosine of each precision against the fp32 export, within
    the precision's goals (the build's accuracy gate limits)."""
    from trtglm.runtime.evaluate import evaluate

    build(shipped_moe, tmp_path / "b", onnx_only=True, overrides={
        "precision": {"dtype": dtype, "quantization": {"block_size": 64}},  # int4 blocks of the 192-wide experts
        "calibration": {"samples": 16, "seq_len": 128}, "shapes": {"logits": "all"}})
    r = evaluate(tmp_path / "b", shipped_moe, samples=8, seq_len=128, backend="ort")
    assert r["gate"]["passed"], r["gate"]
    assert 1 < r["reference_perplexity"] < 100


# glm4_moe_lite (GLM-4.7-Flash): multi-head latent attention over the same experts
LITE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
            max_position_embeddings=256, attention_bias=True, routed_scaling_factor=1.8, pad_token_id=None,
            eos_token_id=[1, 2])
LITE_VARIANTS = {"bottleneck": {}, "direct": dict(q_lora_rank=None, attention_bias=False, rope_interleave=False,
                                                  tie_word_embeddings=True, n_group=1)}


def hf_lite_model(seed: int = 0, **overrides):
    from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

    torch.manual_seed(seed)
    return randomized(Glm4MoeLiteForCausalLM(Glm4MoeLiteConfig(**{**LITE, **overrides})))


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    root = tmp_path_factory.mktemp("lite")
    out = {}
    for i, (name, overrides) in enumerate(LITE_VARIANTS.items()):
        model = hf_lite_model(seed=20 + i, **overrides)
        export(str(add_tokenizer(save_hf(model, root / f"{name}-ckpt"))), root / name)
        out[name] = (model, root / name)
    return out


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_lite_export_matches_transformers(variant, lite):
    model, export_dir = lite[variant]
    assert max_diff(hf_logits(model, STEPS), run_steps(OrtBackend(export_dir / "model.onnx"), STEPS), STEPS) < 1e-4
    meta = json.loads((export_dir / "export.json").read_text())
    assert meta["family"] == "glm4_moe_lite" and meta["validation"]["status"] == "passed"
    # the cache: the latent (32) and the rotary key (8) per token and layer, against 4 heads x (16 + 8 + 12)
    io = {s["name"]: s["shape"] for s in meta["io"]["inputs"]}
    assert io["past_key_values.0.key"] == ["batch", 1, "past_sequence", 32]
    assert io["past_key_values.0.value"] == ["batch", 1, "past_sequence", 8]
    assert meta["kv_cache"]["bytes_per_token"] == 3 * 40 * 4 and meta["kv_cache"]["expanded_kv_bytes_per_token"] == 3 * 4 * 36 * 4


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_lite_fuses_builds_and_generates_like_transformers(variant, lite, tmp_path):
    model, export_dir = lite[variant]
    m = build(export_dir, tmp_path / "b", onnx_only=True, overrides={"shapes": {"logits": "all"}})
    bottleneck = LITE_VARIANTS[variant].get("q_lora_rank", 24) is not None
    assert m["fusion"]["fused"] == {"rms_norm": 3 * (3 + bottleneck) + 1, "rotary": 6, "attention": 0, "qkv": 0}
    assert max_diff(run_steps(OrtBackend(export_dir / "model.onnx"), STEPS),
                    run_steps(OrtBackend(tmp_path / "b" / "model.onnx"), STEPS), STEPS) < 1e-5
    prompts = [[5, 17, 99, 3, 42, 8, 150], [11, 12], [77, 1, 60, 61]]
    build(export_dir, tmp_path / "last", onnx_only=True)
    ours = generate(OrtBackend.from_build(tmp_path / "last"), prompts, max_new_tokens=10).tokens
    assert ours == hf_greedy(model, prompts, 10)


@pytest.mark.parametrize("dtype", ["fp16", "int4"])
def test_lite_engine_builds_for_sm89_and_sm120(dtype, lite, tmp_path):
    m = build(lite["bottleneck"][1], tmp_path / "b", overrides={
        "shapes": {"max_batch": 2, "max_input_len": 32, "max_seq_len": 64}, "builder": {"targets": "sm89,sm120"},
        "precision": {"dtype": dtype, "quantization": {"block_size": 8}}})
    assert m["stage"] == "engine" and m["targets"] == ["sm89", "sm120"]
    if dtype == "int4":
        assert m["precision"]["experts"]["stacked_weights"] == 4


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["glm4_moe", "glm4_moe_lite"])
def test_engine_runner_generates_like_onnx_runtime(family, kv_cache, moe_exports, lite, tmp_path, monkeypatch):
    """fp16 engines of both families (TensorRT-RTX on the CPU) run by the engine backend through the simulated
    TensorRT and pycuda (tests/simgpu): the tokens of ONNX Runtime over the same build."""
    from simgpu import install

    from trtglm.runtime.backends import open_backend

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = moe_exports["groups"] if family == "glm4_moe" else lite["bottleneck"][1]
    build_dir = tmp_path / "b"
    if family == "glm4_moe_lite" and kv_cache == "static":  # refused before any work
        with pytest.raises(UsageError, match="kv_cache: static is not available for multi-head latent attention"):
            build(source, build_dir, overrides={"shapes": {"kv_cache": "static"}})
        assert not build_dir.exists()
        return
    build(source, build_dir, use_cache=False, overrides={
        "shapes": {"max_batch": 3, "max_input_len": 16, "max_seq_len": 64, "kv_cache": kv_cache},
        "precision": {"dtype": "fp16"}})
    install(monkeypatch, build_dir, "tensorrt_rtx")
    engine, why = open_backend(build_dir, "trt")
    assert why == "TensorRT engine"
    ort = OrtBackend.from_build(build_dir)
    prompts = [[5, 17, 99, 3, 42, 8, 150], [11, 12], [77, 1, 60, 61]]
    for batch in ([prompts[0]], prompts):
        assert generate(engine, batch, max_new_tokens=10).tokens == generate(ort, batch, max_new_tokens=10).tokens
    engine.close()


@pytest.mark.parametrize("family", ["glm4_moe", "glm4_moe_lite"])
def test_onnx_runtime_moe_op_applies_the_routing_exactly(family, moe_exports, lite, tmp_path):
    """ONNX Runtime's com.microsoft.MoE in place of each block (runtime/moe_op.py) computes what the graph's own
    gathered form computes, on a left-padded prefill and decode steps, with the correction bias and groups of the
    test models choosing the experts; with int4 experts too."""
    source = moe_exports["groups"] if family == "glm4_moe" else lite["bottleneck"][1]
    build(source, tmp_path / "b", onnx_only=True, overrides={"shapes": {"logits": "all"}})
    op, gathered = (OrtBackend(tmp_path / "b" / "model.onnx", moe_op=flag) for flag in (True, False))
    assert op.moe_blocks == 2 and gathered.moe_blocks == 0
    assert max_diff(run_steps(op, STEPS), run_steps(gathered, STEPS), STEPS) < 1e-5
    # int4 experts: dequantized once at load (the values the graph dequantizes at every step), then the op
    build(source, tmp_path / "q", onnx_only=True, overrides={
        "precision": {"dtype": "int4", "quantization": {"block_size": 8}}, "shapes": {"logits": "all"}})
    import os

    os.link(tmp_path / "q" / "model.onnx.data", tmp_path / "linked")  # as the build cache and packs leave it
    op, gathered = (OrtBackend(tmp_path / "q" / "model.onnx", moe_op=flag) for flag in (True, False))
    assert op.moe_blocks == 2
    a, b = run_steps(op, STEPS), run_steps(gathered, STEPS)
    assert max_diff(a, b, STEPS) < 1e-2 * max(1.0, max(float(np.abs(x).max()) for x in b))  # fp16 compute order


@pytest.mark.parametrize("field, value", [("mla", "x"), ("mla", {"kv_lora_rank": 0}), ("qk_norm", "yes")])
def test_an_edited_export_json_is_refused_naming_the_field(field, value, lite, tmp_path):
    import shutil

    export_dir = tmp_path / "e"
    shutil.copytree(lite["bottleneck"][1], export_dir)
    meta = json.loads((export_dir / "export.json").read_text())
    meta["config"][field] = value
    (export_dir / "export.json").write_text(json.dumps(meta))
    with pytest.raises(TrtglmError, match=rf"export.json: config.{field}"):
        build(export_dir, tmp_path / "b", onnx_only=True)
    assert not (tmp_path / "b").exists()


def test_staged_build_of_latent_attention(lite, tmp_path):
    """glm4_moe_lite cut one layer per stage: the latent caches of each stage's layers, one hidden tensor between
    stages, the chain equal to the whole graph."""
    from models import one_layer_per_stage
    from test_stages import assert_same_steps

    export_dir = lite["bottleneck"][1]
    build(export_dir, tmp_path / "whole", onnx_only=True)
    m = build(export_dir, tmp_path / "staged", onnx_only=True,
              overrides={"builder": {"max_memory": one_layer_per_stage(export_dir)}})
    assert [s["layers"] for s in m["stages"]] == [[0, 1], [1, 2], [2, 3]]
    assert_same_steps(OrtBackend.from_build(tmp_path / "whole"), OrtBackend.from_build(tmp_path / "staged"))
