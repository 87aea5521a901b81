"""Single ONNX Runtime CPU kernels behind two choices, timed side by side in one run:

- integer GEMM for int8 builds (trtglm/integer_gemm.py): one decode-step linear layer (M=1, K=768, N=2560, the
  136M model's gate_up) as fp32 MatMul and as MatMulIntegerToFloat with an unsigned and a signed left operand
  (why the rewrite shifts activations to uint8);
- attention for a 512-token prefill of one layer (12 query / 2 KV heads of 64): the opset-23 Attention op that
  fusion emits against com.microsoft.MultiHeadAttention on repeated K/V (why ONNX Runtime's prefill is not
  lowered to it).

    python bench/kernels.py [--runs 300]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def session(nodes, inputs, initializers=(), microsoft: bool = False) -> ort.InferenceSession:
    graph = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info("y", T.FLOAT, None)], list(initializers))
    opsets = [h.make_opsetid("", 23)] + ([h.make_opsetid("com.microsoft", 1)] if microsoft else [])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 2, 3
    return ort.InferenceSession(h.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def best_us(s: ort.InferenceSession, feeds: dict, runs: int) -> float:
    for _ in range(10):
        s.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, feeds)
        times.append(time.perf_counter() - t)
    return 1e6 * float(np.median(times))


def gemm(runs: int) -> None:
    k, n = 768, 2560
    rng = np.random.default_rng(0)
    x = h.make_tensor_value_info("x", T.FLOAT, [1, 1, k])
    fp32 = session([h.make_node("MatMul", ["x", "w"], ["y"])], [x],
                   [nh.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")])
    rows = {"fp32 MatMul": best_us(fp32, {"x": rng.standard_normal((1, 1, k)).astype(np.float32)}, runs)}
    for name, dtype, proto in (("uint8", np.uint8, T.UINT8), ("int8", np.int8, T.INT8)):
        s = session([h.make_node("MatMulIntegerToFloat", ["x", "w", "sa", "sb"], ["y"], domain="com.microsoft")],
                    [h.make_tensor_value_info("x", proto, [1, 1, k])],
                    [nh.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "w"),
                     nh.from_array(np.array(0.1, np.float32), "sa"), nh.from_array(np.full(n, 0.01, np.float32), "sb")],
                    microsoft=True)
        a = rng.integers(0, 128, (1, 1, k)).astype(dtype)
        rows[f"MatMulIntegerToFloat, {name} activations x int8 weights"] = best_us(s, {"x": a}, runs)
    print(f"\ndecode-step GEMM M=1 K={k} N={n}, median of {runs} runs, 2 threads\n")
    print("| kernel | us |\n|---|---|")
    for label, us in rows.items():
        print(f"| {label} | {us:.0f} |")


def attention(runs: int) -> None:
    b, heads, kv, s, d = 1, 12, 2, 512, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((b, heads, s, d), (b, kv, s, d), (b, kv, s, d)))
    causal = np.tril(np.ones((s, s), bool))[None, None]
    onnx_attention = session(
        [h.make_node("Attention", ["q", "k", "v", "m"], ["y"], q_num_heads=heads, kv_num_heads=kv)],
        [h.make_tensor_value_info("q", T.FLOAT, q.shape), h.make_tensor_value_info("k", T.FLOAT, k.shape),
         h.make_tensor_value_info("v", T.FLOAT, v.shape), h.make_tensor_value_info("m", T.BOOL, causal.shape)])
    mha = session(
        [h.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "bias"], ["y"], domain="com.microsoft",
                     num_heads=heads)],
        [h.make_tensor_value_info("q", T.FLOAT, [b, s, heads * d]), h.make_tensor_value_info("k", T.FLOAT, [b, heads, s, d]),
         h.make_tensor_value_info("v", T.FLOAT, [b, heads, s, d]), h.make_tensor_value_info("bias", T.FLOAT, [1, 1, s, s])],
        microsoft=True)
    a = best_us(onnx_attention, {"q": q, "k": k, "v": v, "m": causal}, runs)
    feeds = {"q": q.transpose(0, 2, 1, 3).reshape(b, s, heads * d), "k": np.repeat(k, heads // kv, axis=1),
             "v": np.repeat(v, heads // kv, axis=1), "bias": np.where(causal, 0, -np.inf).astype(np.float32)}
    m = best_us(mha, feeds, runs)
    print(f"\none layer's attention, {s}-token prefill, {heads}/{kv} heads of {d}, median of {runs} runs\n")
    print("| kernel | ms |\n|---|---|")
    print(f"| Attention (opset 23, GQA, boolean mask) | {a / 1000:.1f} |")
    print(f"| com.microsoft.MultiHeadAttention (K/V repeated, additive mask) | {m / 1000:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()
    gemm(args.runs)
    attention(max(10, args.runs // 10))


if __name__ == "__main__":
    main()
