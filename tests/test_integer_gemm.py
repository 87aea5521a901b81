"""int8 Q/DQ MatMuls -> ONNX Runtime integer GEMMs (MatMulIntegerToFloat): the same arithmetic, checked
against the Q/DQ graph in ONNX Runtime with its optimizations off (the unrewritten form dequantizes).

The data saturate a u8s8 kernel that multiplies byte pairs into int16 (x86 without VNNI): full-range int8
weights and activations with pairs of same-sign extremes. Each form is checked on the CPU the test runs on
against what `select_form`'s rule says of that CPU: exact where the rule picks or trusts it, and, for u8s8
on an x86 CPU without VNNI, visibly wrong (so the data do reach the saturating case). `make test` also runs
this file under `qemu-x86_64 -cpu Haswell` (AVX2 without VNNI) where QEMU is installed."""

import os
import platform

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from trtglm.runtime.integer_gemm import (
    FORMS,
    NO_QDQ_FUSION,
    cpu_features,
    lower,
    select_form,
)

K, N = 64, 48
HASWELL = frozenset({"SSE", "SSE2", "SSE3", "SSSE3", "SSE41", "SSE42", "AVX", "F16C", "FMA3", "AVX2"})
ICELAKE = HASWELL | {"AVX512F", "AVX512CD", "AVX512BW", "AVX512DQ", "AVX512VL", "AVX512VNNI"}
SKYLAKE_X = HASWELL | {"AVX512F", "AVX512CD", "AVX512BW", "AVX512DQ", "AVX512VL"}  # AVX-512 without VNNI


def weights(rng, dtype=np.int8) -> np.ndarray:
    """Full range, with every other pair of rows at the same-sign extreme (saturates a pairwise int16 sum)."""
    info = np.iinfo(dtype)
    w = rng.integers(info.min + 1, info.max + 1, (K, N)).astype(dtype)
    w[0:K // 2:2], w[1:K // 2:2] = info.max, info.max
    return w


def qdq_matmul(dtype=np.float32, a_zero=3, w_scales=N, w_zero=0, weight=np.int8, act=np.int8, block=0,
               dq_scale=None) -> ir.Model:
    """x -> Q -> DQ -> MatMul <- DQ(W); scales in `dtype`, so the MatMul computes in it."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(weights(rng, weight), "wq"),
             nh.from_array(rng.uniform(0.001, 0.01, w_scales if not block else (K // block, N)).astype(dtype), "ws"),
             nh.from_array(np.full(w_scales if not block else (K // block, N), w_zero, weight), "wz"),
             nh.from_array(np.array(0.02, dtype), "s"), nh.from_array(np.array(a_zero, act), "z"),
             nh.from_array(np.array(dq_scale or 0.02, dtype), "s2")]
    w_attrs = {"axis": 0, "block_size": block} if block else {"axis": 1} if w_scales != 1 else {}
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             h.make_node("DequantizeLinear", ["q", "s2", "z"], ["a"]),
             h.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["b"], **w_attrs),
             h.make_node("MatMul", ["a", "b"], ["m"]), h.make_node("Neg", ["m"], ["y"])]
    t = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", t, [2, 5, K])],
                         [h.make_tensor_value_info("y", t, [2, 5, N])], inits)
    return ir.from_proto(h.make_model(graph, ir_version=10, opset_imports=[h.make_opsetid("", 21)]))


def run(model: ir.Model, x: np.ndarray, optimize: bool = False) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if optimize:  # as the backend runs it: its own Q/DQ fusion off, the u8u8 weight shift folded at load
        opts.add_session_config_entry(*NO_QDQ_FUSION)
    else:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def feed(dtype=np.float32) -> np.ndarray:
    """Activations over the whole int8 range at scale 0.02, every other pair of columns at +127."""
    x = np.random.default_rng(1).uniform(-3, 3, (2, 5, K))
    x[..., 0:K // 2:2], x[..., 1:K // 2:2] = 2.6, 2.6  # -> 127 after the zero point 3 (saturates at 127)
    return x.astype(dtype)


def x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def exact_here(form: str) -> bool | None:
    """What the selection rule says of `form` on this CPU: exact (True), saturating (False), unknown (None)."""
    if form != "u8s8":
        return True
    if select_form()[0] == "u8s8":
        return True
    return False if x86() else None


OPS = {"u8s8": ["QuantizeLinear", "MatMulIntegerToFloat", "Neg"],
       "u8u8": ["QuantizeLinear", "Cast", "Add", "Cast", "MatMulIntegerToFloat", "Neg"],
       "dequantize": ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul", "Neg"]}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", [dict(), dict(a_zero=0), dict(w_scales=1), dict(w_zero=2)],
                         ids=["per_column", "zero_point_0", "per_tensor_weight", "weight_zero_point"])
def test_each_form_is_exact_where_the_rule_says_and_only_there(form, case):
    model = qdq_matmul(**case)
    x = feed()
    before = run(model, x)
    assert lower(model, form) == (0 if form == "dequantize" else 1)
    assert [n.op_type for n in model.graph if n.op_type != "Constant"] == OPS[form]
    tolerance = 1e-5 * np.abs(before).max()
    for optimize in (False, True):
        error = np.abs(run(model, x, optimize) - before).max()
        expected = exact_here(form)
        if expected is None:
            pytest.skip(f"{platform.machine()}: the rule does not pick u8s8 here and says nothing of its kernel")
        assert (error <= tolerance) == expected, (
            f"{form} on {select_form()}: max error {error:.3g} (tolerance {tolerance:.3g})")
    assert lower(model, form) == 0  # idempotent


def test_the_default_form_is_exact_on_this_cpu():
    model = qdq_matmul()
    x = feed()
    before = run(model, x)
    lower(model)
    np.testing.assert_allclose(run(model, x, optimize=True), before, atol=1e-5 * np.abs(before).max(), rtol=0)


def test_u8s8_only_with_vnni():
    assert select_form(HASWELL, "x86_64")[0] == "u8u8"
    assert select_form(SKYLAKE_X, "x86_64")[0] == "u8u8"  # AVX-512 alone still pairs bytes into int16
    assert select_form(ICELAKE, "x86_64")[0] == "u8s8"
    assert select_form(ICELAKE | {"AMX_TILE"}, "AMD64")[0] == "u8s8"
    assert select_form(frozenset({"SSE", "SSE2"}), "x86_64")[0] == "u8u8"
    assert select_form(frozenset({"NEON", "ASIMD", "ASIMDDP"}), "aarch64")[0] == "u8u8"


@pytest.mark.skipif(os.environ.get("TRTGLM_EMULATED_CPU") != "haswell",
                    reason="only under `make test`'s qemu-x86_64 -cpu Haswell run")
def test_the_emulated_cpu_is_avx2_without_vnni():
    assert {"AVX2"} <= cpu_features() and "AVX512VNNI" not in cpu_features() and "AVX512F" not in cpu_features()
    assert select_form()[0] == "u8u8"


def test_fp16_matmul_gets_its_dtype_back():
    model = qdq_matmul(np.float16)
    x = feed(np.float16)
    before = run(model, x)
    assert lower(model) == 1
    after = run(model, x)
    assert after.dtype == np.float16
    # the integer product is exact; the fp16 graph rounds each dequantized weight: apart by the output's fp16 rounding
    before = before.astype(np.float32)
    np.testing.assert_allclose(after.astype(np.float32), before, atol=2 ** -10 * np.abs(before).max(), rtol=0)


def test_unknown_form_is_refused():
    with pytest.raises(ValueError, match="u8u8"):
        lower(qdq_matmul(), "s4s4")


@pytest.mark.parametrize("form", ["u8s8", "u8u8"])
@pytest.mark.parametrize("case", [dict(block=16), dict(weight=np.uint8), dict(dq_scale=0.03)],
                         ids=["blockwise_weight", "uint8_weight", "scales_disagree"])
def test_other_quantizations_are_left_alone(case, form):
    model = qdq_matmul(**case)
    assert lower(model, form) == 0
    assert "MatMulIntegerToFloat" not in [n.op_type for n in model.graph]
