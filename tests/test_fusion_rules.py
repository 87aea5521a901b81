"""Each fusion rule on micro-graphs: the variants it must fuse, the ones it must refuse, ONNX Runtime
equality before/after (fp32 atol 1e-5), and idempotence."""

import numpy as np
import onnx_ir as ir
import pytest
from fusion_graphs import BOOL, F16, F32, I64, config, micro, ops, run, weight

from trtglm.fusion import fuse
from trtglm.model import decoder as G

RNG = np.random.default_rng(0)


def clone(model):
    return ir.from_proto(ir.to_proto(model))


def fused(model, fusions, max_positions=64):
    before = clone(model)
    report = fuse(model, max_positions=max_positions, strict=False, fusions=frozenset(fusions))
    again = fuse(clone(model), max_positions=max_positions, strict=False, fusions=frozenset(fusions))
    assert not any(again.rewrites.values()), f"second run rewrote {again.rewrites}"
    return before, report


def assert_same(before, after, feeds, atol=1e-5):
    for a, b in zip(run(before, feeds), run(after, feeds)):
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)


# ---------------------------------------------------------------- RMSNorm
X = {"x": (F32, (2, 3, 16))}
SCALE = (RNG.uniform(0.5, 1.5, 16)).astype(np.float32)


def div_norm(g, x, scale_last=True):
    var = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), g.const([-1], np.int64), keepdims=1)
    normed = g.op("Div", x, g.op("Sqrt", g.op("Add", var, g.const(1e-6, np.float32))))
    w = weight(g, SCALE, "norm.weight")
    return g.op("Mul", normed, w) if scale_last else g.op("Mul", w, normed)


@pytest.mark.parametrize("variant", ["pow_reciprocal", "div_scale_last", "fp16_with_casts"])
def test_rms_norm_fuses(variant):
    if variant == "fp16_with_casts":
        model = micro(lambda g, x: G._rms_norm(g, x, weight(g, SCALE.astype(np.float16), "w"), 1e-5),
                      {"x": (F16, (2, 3, 16))}, dtype=F16)
        feeds = {"x": RNG.normal(size=(2, 3, 16)).astype(np.float16)}
    elif variant == "div_scale_last":
        model = micro(div_norm, X)
        feeds = {"x": RNG.normal(size=(2, 3, 16)).astype(np.float32)}
    else:
        model = micro(lambda g, x: G._rms_norm(g, x, weight(g, SCALE, "w"), 1e-5), X)
        feeds = {"x": RNG.normal(size=(2, 3, 16)).astype(np.float32)}
    before, report = fused(model, ["rms_norm"])
    assert report.fused["rms_norm"] == 1 and ops(model) == ["RMSNormalization"]
    assert_same(before, model, feeds, atol=1e-2 if variant.startswith("fp16") else 1e-5)


def _norm_with(eps=None, axis=-1, scale_shape=(16,)):
    def build(g, x):
        var = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), g.const([axis], np.int64), keepdims=1)
        inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, eps if eps is not None else g.const(1e-6, np.float32))))
        return g.op("Mul", weight(g, np.ones(scale_shape, np.float32), "w"), g.op("Mul", x, inv))
    return build


@pytest.mark.parametrize("case", ["int_epsilon", "not_last_axis", "2d_scale", "epsilon_from_input"])
def test_rms_norm_refuses(case):
    inputs = dict(X)
    if case == "int_epsilon":
        build = lambda g, x: _norm_with(eps=g.const(1, np.int32))(g, x)  # noqa: E731
    elif case == "not_last_axis":
        build = _norm_with(axis=1)
    elif case == "2d_scale":
        build = _norm_with(scale_shape=(1, 16))
    else:
        inputs["eps"] = (F32, ())
        build = lambda g, x, eps: _norm_with(eps=eps)(g, x)  # noqa: E731
    model = micro(build, inputs)
    n = len(ops(model))
    report = fuse(model, max_positions=8, strict=False, fusions=frozenset({"rms_norm"}))
    assert report.fused["rms_norm"] == 0 and len(ops(model)) <= n


# ---------------------------------------------------------------- rotary
B, H, S, D = 2, 4, 5, 16


def rope_inputs():
    return {"x": (F32, (B, H, S, D)), "position_ids": (I64, (B, S))}


def rope_feeds():
    return {"x": RNG.normal(size=(B, H, S, D)).astype(np.float32),
            "position_ids": np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], np.int64)}


def strided_rope(g, x, position_ids, c, sized=lambda t: t):
    """The torch.stack((-x2, x1), -1).flatten(-2) form of the interleaved rotation."""
    cos, sin = (sized(t) for t in G._rope_tables(g, c, position_ids))
    rot = c.rotary_dim
    x_rot = g.op("Slice", x, g.const([0], np.int64), g.const([rot], np.int64), g.const([-1], np.int64))
    x1 = g.op("Slice", x_rot, g.const([0], np.int64), g.const([rot], np.int64), g.const([-1], np.int64), g.const([2], np.int64))
    x2 = g.op("Slice", x_rot, g.const([1], np.int64), g.const([rot], np.int64), g.const([-1], np.int64), g.const([2], np.int64))
    stacked = g.op("Concat", g.op("Unsqueeze", g.op("Neg", x2), g.const([-1], np.int64)),
                   g.op("Unsqueeze", x1, g.const([-1], np.int64)), axis=-1)
    rotated = g.op("Reshape", stacked, g.const([0, 0, 0, rot], np.int64))
    out = g.op("Add", g.op("Mul", x_rot, cos), g.op("Mul", rotated, sin))
    x_pass = g.op("Slice", x, g.const([rot], np.int64), g.const([D], np.int64), g.const([-1], np.int64))
    return g.op("Concat", out, x_pass, axis=-1)


def half_rope(g, x, position_ids, table="half"):
    """Full rotate-half (Llama layout); table='interleaved' builds GLM's pair-repeated table instead."""
    inv_freq = 1.0 / (10000 ** (np.arange(0, D, 2, dtype=np.float32) / D))
    freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", position_ids, to=F32), g.const([-1], np.int64)),
                 g.const(inv_freq))
    tables = []
    for fn in ("Cos", "Sin"):
        t = g.op(fn, freqs)
        if table == "half":
            t = g.op("Concat", t, t, axis=-1)
        else:
            t = g.op("Unsqueeze", t, g.const([-1], np.int64))
            t = g.op("Reshape", g.op("Concat", t, t, axis=-1), g.const([0, 0, D], np.int64))
        tables.append(g.op("Unsqueeze", t, g.const([1], np.int64)))
    x1 = g.op("Slice", x, g.const([0], np.int64), g.const([D // 2], np.int64), g.const([-1], np.int64))
    x2 = g.op("Slice", x, g.const([D // 2], np.int64), g.const([D], np.int64), g.const([-1], np.int64))
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, tables[0]), g.op("Mul", rotated, tables[1]))


@pytest.mark.parametrize("variant", ["glm_pairs_partial", "glm_pairs_full", "strided_partial", "rotate_half"])
def test_rotary_fuses(variant):
    if variant == "glm_pairs_partial":
        c = config()
        build = lambda g, x, p: G._apply_rope(g, c, x, *G._rope_tables(g, c, p))  # noqa: E731
    elif variant == "glm_pairs_full":
        c = config(rotary_dim=D)
        build = lambda g, x, p: G._apply_rope(g, c, x, *G._rope_tables(g, c, p))  # noqa: E731
    elif variant == "strided_partial":
        build = lambda g, x, p: strided_rope(g, x, p, config())  # noqa: E731
    else:
        build = half_rope
    model = micro(build, rope_inputs())
    before, report = fused(model, ["rotary", "rotary_keys"])
    assert report.fused["rotary"] == 1
    node = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
    assert node.attributes["interleaved"].as_int() == (variant != "rotate_half")
    assert node.attributes["rotary_embedding_dim"].as_int() == (8 if variant.endswith("partial") else 0)
    assert node.inputs[1].const_value.shape == (64, (8 if variant.endswith("partial") else D) // 2)
    assert_same(before, model, rope_feeds())


def test_rotary_refuses_a_table_that_does_not_match_the_rotation():
    """Rotate-half rotation with GLM's pair-repeated table: not a rotary embedding either op can express."""
    model = micro(lambda g, x, p: half_rope(g, x, p, table="interleaved"), rope_inputs())
    report = fuse(model, max_positions=64, strict=False, fusions=frozenset({"rotary", "rotary_keys"}))
    assert report.fused["rotary"] == 0


def test_rotary_refuses_tables_that_mix_the_batch_rows():
    """A table computed from the first row's positions and broadcast to every row is no per-position table."""
    def build(g, x, p):
        def first_row(t):
            return g.op("Expand", g.op("Slice", t, g.const([0], np.int64), g.const([1], np.int64),
                                       g.const([0], np.int64)), g.op("Shape", t))
        return strided_rope(g, x, p, config(), first_row)
    model = micro(build, {"x": (F32, ("batch", H, "seq", D)), "position_ids": (I64, ("batch", "seq"))})
    assert fuse(model, max_positions=64, strict=False, fusions=frozenset({"rotary"})).fused["rotary"] == 0


def test_rotary_refuses_tables_that_depend_on_another_input():
    c = config()

    def build(g, x, p, scale):
        cos, sin = G._rope_tables(g, c, p)
        return G._apply_rope(g, c, x, g.op("Mul", cos, scale), sin)
    model = micro(build, {**rope_inputs(), "scale": (F32, (1,))})
    assert fuse(model, max_positions=64, strict=False, fusions=frozenset({"rotary"})).fused["rotary"] == 0


def test_rotary_tables_may_read_another_inputs_shape():
    """torch's dynamo exporter (transformers 5.17's GLM-4) sizes cos/sin with a dimension read off another
    input, the KV cache's batch: only its Shape is read, so the tables still depend on position_ids alone."""
    def build(g, x, p, past):
        def repeat_interleave(t):  # as the exporter writes t[..., ::2].repeat_interleave(2, -1), sized off past
            half = g.op("Unsqueeze", g.op("Slice", t, g.const([0], np.int64), g.const([8], np.int64),
                                          g.const([-1], np.int64), g.const([2], np.int64)), g.const([-1], np.int64))
            pairs = g.op("Concat", g.op("Shape", past, start=0, end=1), g.op("Shape", half, start=1, end=-1),
                         g.const([2], np.int64), axis=0)
            return g.op("Reshape", g.op("Expand", half, pairs), g.const([0, 0, 0, 8], np.int64))
        return strided_rope(g, x, p, config(), repeat_interleave)
    model = micro(build, {"x": (F32, ("batch", H, "seq", D)), "position_ids": (I64, ("batch", "seq")),
                          "past": (F32, ("batch", 2, "past", D))})
    before, report = fused(model, ["rotary", "rotary_keys"])
    assert report.fused["rotary"] == 1
    node = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
    assert node.inputs[3].name == "position_ids" and node.inputs[1].const_value.shape == (64, 4)
    assert_same(before, model, rope_feeds() | {"past": np.zeros((B, 2, 3, D), np.float32)})


def test_rotary_tables_are_shared_between_layers():
    c = config()

    def build(g, x, p):
        cos, sin = G._rope_tables(g, c, p)
        return G._apply_rope(g, c, x, cos, sin), G._apply_rope(g, c, g.op("Neg", x), cos, sin)
    model = micro(build, rope_inputs())
    before, report = fused(model, ["rotary", "rotary_keys"])
    nodes = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert len(nodes) == 2 and nodes[0].inputs[1] is nodes[1].inputs[1] and nodes[0].inputs[2] is nodes[1].inputs[2]
    assert_same(before, model, rope_feeds())


# ---------------------------------------------------------------- key rotation folded into the projection
HID, KVH, PAST = 32, 2, 3


def key_inputs():
    return {"h": (F32, (B, S, HID)), "position_ids": (I64, (B, S)), "past": (F32, (B, KVH, PAST, D))}


def key_feeds():
    return {"h": RNG.normal(size=(B, S, HID)).astype(np.float32),
            "position_ids": np.array([[3, 4, 5, 6, 7], [10, 11, 12, 13, 14]], np.int64),
            "past": RNG.normal(size=(B, KVH, PAST, D)).astype(np.float32)}


def projected_keys(rotate, merged=True, read_again=False):
    """h -> q/k/v projection (merged + Split, or k alone) -> [B, KV, S, D] keys -> rotation -> Concat onto past."""
    c = config(num_kv_heads=KVH)
    widths = [H * D, KVH * D, KVH * D] if merged else [KVH * D]
    w = RNG.normal(size=(HID, sum(widths))).astype(np.float32)
    b = RNG.normal(size=sum(widths)).astype(np.float32)

    def build(g, h, p, past):
        proj = g.op("Add", g.op("MatMul", h, weight(g, w, "qkv.weight")), weight(g, b, "qkv.bias"))
        parts = g.ops("Split", proj, g.const(widths, np.int64), num_outputs=3, axis=-1) if merged else [proj]
        k = g.op("Transpose", g.op("Reshape", parts[min(1, len(parts) - 1)], g.const([0, 0, KVH, D], np.int64)),
                 perm=[0, 2, 1, 3])
        if rotate == "glm_pairs_partial":
            k_rot = G._apply_rope(g, c, k, *G._rope_tables(g, c, p))
        elif rotate == "strided_partial":
            k_rot = strided_rope(g, k, p, c)
        else:
            k_rot = half_rope(g, k, p)
        outs = [g.op("Concat", past, k_rot, axis=2)]
        if merged:
            outs += [parts[0], parts[2]]
        if read_again:
            outs.append(g.op("Sigmoid", parts[1] if merged else proj))
        return outs
    return micro(build, key_inputs())


@pytest.mark.parametrize("rotate", ["glm_pairs_partial", "strided_partial", "rotate_half"])
@pytest.mark.parametrize("merged", [True, False], ids=["qkv_split", "k_alone"])
def test_key_rotation_folds_into_the_projection(rotate, merged):
    model = projected_keys(rotate, merged)
    before, report = fused(model, ["rotary", "rotary_keys_folded"])
    assert report.rewrites["rotary_keys_folded"] == 1 and report.fused["rotary"] == 0
    assert not {"RotaryEmbedding", "Slice", "Neg", "Sin"} & set(ops(model)[:-1]), ops(model)
    width = [H * D, KVH * D, KVH * D] if merged else [KVH * D]
    (matmul,) = [n for n in model.graph if n.op_type == "MatMul"]
    assert matmul.inputs[1].shape == (HID, sum(width) + KVH * D) and matmul.inputs[1].name == "qkv.weight"
    assert_same(before, model, key_feeds())


def test_key_rotation_fold_refuses_keys_read_before_rotation():
    from trtglm.fusion import FusionError

    model = projected_keys("glm_pairs_partial", read_again=True)
    report = fuse(model, max_positions=64, strict=False, fusions=frozenset({"rotary", "rotary_keys_folded"}))
    assert report.fused["rotary_keys_folded"] == 0 and report.fused["rotary"] == 1  # left a RotaryEmbedding
    with pytest.raises(FusionError, match=r"0 folded key rotation\(s\) in the graph, expected 1; refused: .*read "
                                          r"elsewhere"):
        fuse(projected_keys("glm_pairs_partial", read_again=True), max_positions=64, strict=True,
             expected={"rotary_keys_folded": 1}, fusions=frozenset({"rotary", "rotary_keys_folded"}))


def test_key_rotation_options_are_alternatives():
    from trtglm.core.errors import TrtglmError

    with pytest.raises(TrtglmError, match="alternatives"):
        fuse(projected_keys("rotate_half"), max_positions=64, fusions=frozenset({"rotary", "rotary_keys",
                                                                                 "rotary_keys_folded"}))


# ---------------------------------------------------------------- attention
KV, T = 2, 7


def attention_core(g, q, k, v, bias, repeat=True, unsqueeze_axis=2, scale=None):
    if repeat and unsqueeze_axis != 2:  # tiles the KV heads (k0,k1,k0,k1): not grouped-query attention
        k, v = (g.op("Reshape", g.op("Expand", g.op("Unsqueeze", t, g.const([1], np.int64)),
                                     g.const([B, H // KV, KV, T, D], np.int64)), g.const([B, H, T, D], np.int64))
                for t in (k, v))
    elif repeat:
        k, v = (G._repeat_kv(g, t, KV, H // KV) for t in (k, v))
    scale = scale if scale is not None else g.compute_const(D ** -0.5)
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), scale)
    probs = g.op("Softmax", g.op("Add", g.cast(scores, F32), bias), axis=-1)
    return g.op("MatMul", g.cast(probs, g.dtype), v)


def attention_feeds(kv=KV, mask="causal", dtype=np.float32):
    feeds = {"q": RNG.normal(size=(B, H, S, D)).astype(dtype), "k": RNG.normal(size=(B, kv, T, D)).astype(dtype),
             "v": RNG.normal(size=(B, kv, T, D)).astype(dtype)}
    allowed = np.tril(np.ones((S, T), bool), k=T - S)[None, None].repeat(B, 0)
    if mask == "random":
        allowed = RNG.random((B, 1, S, T)) > 0.4
        allowed[..., 0] = True
    feeds["allowed"] = allowed
    return feeds


def where_bias(g, allowed):
    return g.op("Where", allowed, g.const(0.0, np.float32), g.const(np.finfo(np.float32).min, np.float32))


ATT_INPUTS = {"q": (F32, (B, H, S, D)), "k": (F32, (B, KV, T, D)), "v": (F32, (B, KV, T, D)),
              "allowed": (BOOL, (B, 1, S, T))}


@pytest.mark.parametrize("mask", ["causal", "random"])
def test_attention_gqa_with_boolean_mask(mask):
    """The mask is kept as given (lower-right causal in decode, or any mask at all), never is_causal."""
    model = micro(lambda g, q, k, v, m: attention_core(g, q, k, v, where_bias(g, m)), ATT_INPUTS)
    before, report = fused(model, ["attention"])
    assert report.fused["attention"] == 1 and "Expand" not in ops(model) and "Softmax" not in ops(model)
    node = next(n for n in model.graph if n.op_type == "Attention")
    assert node.inputs[3].name == "allowed" and "is_causal" not in node.attributes
    assert_same(before, model, attention_feeds(mask=mask))


def test_attention_without_repeat_and_an_additive_mask():
    inputs = {"q": (F32, (B, H, S, D)), "k": (F32, (B, H, T, D)), "v": (F32, (B, H, T, D)),
              "bias": (F32, (B, 1, S, T))}
    model = micro(lambda g, q, k, v, b: attention_core(g, q, k, v, b, repeat=False), inputs)
    before, report = fused(model, ["attention"])
    assert report.fused["attention"] == 1
    feeds = attention_feeds(kv=H)
    feeds["bias"] = np.where(feeds.pop("allowed"), 0.0, -1e9).astype(np.float32)
    assert_same(before, model, feeds)


def test_attention_fp16_keeps_the_fp32_softmax_accuracy():
    inputs = {k: (F16 if t == F32 else t, s) for k, (t, s) in ATT_INPUTS.items()}
    model = micro(lambda g, q, k, v, m: attention_core(g, q, k, v, where_bias(g, m)), inputs, dtype=F16)
    before, report = fused(model, ["attention"])
    assert report.fused["attention"] == 1
    assert_same(before, model, attention_feeds(dtype=np.float16), atol=2e-3)


def test_attention_over_tiled_heads_is_not_grouped_query_attention():
    """Tiling KV heads (k0,k1,k0,k1) is not GQA's repeat (k0,k0,k1,k1): only the plain rule may fuse it,
    over the tiled tensors, and the result must still be equal."""
    model = micro(lambda g, q, k, v, m: attention_core(g, q, k, v, where_bias(g, m), unsqueeze_axis=1), ATT_INPUTS)
    before, report = fused(model, ["attention"])
    assert report.rewrites["attention_gqa"] == 0 and "Expand" in ops(model)
    assert_same(before, model, attention_feeds())


@pytest.mark.parametrize("case", ["scale_from_input", "fp32_bias_fp16_query"])
def test_attention_refuses(case):
    if case == "scale_from_input":
        model = micro(lambda g, q, k, v, m, s: attention_core(g, q, k, v, where_bias(g, m), scale=s),
                      {**ATT_INPUTS, "s": (F32, ())})
    else:
        inputs = {k: (F16 if t == F32 else t, s) for k, (t, s) in ATT_INPUTS.items()}
        inputs["bias"] = (F32, (B, 1, S, T))
        model = micro(lambda g, q, k, v, m, b: attention_core(g, q, k, v, b), inputs, dtype=F16)
    assert fuse(model, max_positions=8, strict=False, fusions=frozenset({"attention"})).fused["attention"] == 0
