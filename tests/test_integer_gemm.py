"""int8 Q/DQ MatMuls -> ONNX Runtime integer GEMMs (MatMulIntegerToFloat): the same arithmetic, checked
against the Q/DQ graph in ONNX Runtime with its optimizations off (the unrewritten form dequantizes)."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from trtglm.integer_gemm import lower

K, N = 64, 48


def qdq_matmul(dtype=np.float32, a_zero=3, w_scales=N, w_zero=0, weight=np.int8, act=np.int8, block=0,
               dq_scale=None) -> ir.Model:
    """x -> Q -> DQ -> MatMul <- DQ(W); scales in `dtype`, so the MatMul computes in it."""
    rng = np.random.default_rng(0)
    info = np.iinfo(weight)
    inits = [nh.from_array(rng.integers(info.min + 1, info.max + 1, (K, N)).astype(weight), "wq"),
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


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def feed(dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(1).standard_normal((2, 5, K)) * 2).astype(dtype)  # some saturate (|x/s| > 127)


@pytest.mark.parametrize("case", [dict(), dict(a_zero=0), dict(w_scales=1), dict(w_zero=2)],
                         ids=["per_column", "zero_point_0", "per_tensor_weight", "weight_zero_point"])
def test_int8_matmul_becomes_an_integer_gemm(case):
    model = qdq_matmul(**case)
    x = feed()
    before = run(model, x)
    assert lower(model) == 1
    assert [n.op_type for n in model.graph if n.op_type != "Constant"] == ["QuantizeLinear", "MatMulIntegerToFloat",
                                                                          "Neg"]
    np.testing.assert_allclose(run(model, x), before, atol=1e-5 * np.abs(before).max(), rtol=0)
    assert lower(model) == 0  # idempotent


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


@pytest.mark.parametrize("case", [dict(block=16), dict(weight=np.uint8), dict(dq_scale=0.03)],
                         ids=["blockwise_weight", "uint8_weight", "scales_disagree"])
def test_other_quantizations_are_left_alone(case):
    model = qdq_matmul(**case)
    assert lower(model) == 0
    assert "MatMulIntegerToFloat" not in [n.op_type for n in model.graph]
