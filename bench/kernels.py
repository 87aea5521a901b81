"""Single ONNX Runtime CPU kernels behind two choices, timed side by side in one run:

- integer GEMMs for int8 builds (trtglm/runtime/integer_gemm.py): one linear layer (K=768, N=2560, the 136M
  model's gate_up) at a decode step and a 512-token prefill, as fp32 MatMul and in every integer GEMM form, each
  with its error against the exact product on full-range data (u8s8 is wrong on x86 CPUs without VNNI);
- attention for a 512-token prefill of one layer (12 query / 2 KV heads of 64): the opset-23 Attention op that
  fusion emits against com.microsoft.MultiHeadAttention on repeated K/V (why ONNX Runtime's prefill is not
  lowered to it).

    python bench/kernels.py [--runs 300]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
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


def _qdq_linear(k: int, n: int, rng) -> tuple[bytes, np.ndarray, np.ndarray]:
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear(W int8, per column): an int8 build's
    linear layer; and its int8 weights (full range) and their scales."""
    w, ws = rng.integers(-127, 128, (k, n)).astype(np.int8), rng.uniform(0.001, 0.01, n).astype(np.float32)
    inits = [nh.from_array(w, "w"), nh.from_array(ws, "ws"),
             nh.from_array(np.zeros(n, np.int8), "wz"), nh.from_array(np.array(0.02, np.float32), "s"),
             nh.from_array(np.array(0, np.int8), "z")]
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), h.make_node("DequantizeLinear", ["q", "s", "z"], ["a"]),
             h.make_node("DequantizeLinear", ["w", "ws", "wz"], ["b"], axis=1), h.make_node("MatMul", ["a", "b"], ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["m", k])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["m", n])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21)], ir_version=10).SerializeToString(), w, ws


def gemm(runs: int) -> None:
    """Every integer GEMM form of an int8 linear layer (trtglm/runtime/integer_gemm.py) against fp32 MatMul, at a
    decode step (M=1) and a 512-token prefill, with its error on full-range data against the exact product."""
    import onnx_ir as ir

    from trtglm.runtime.integer_gemm import FORMS, NO_QDQ_FUSION, lower, select_form

    k, n = 768, 2560
    rng = np.random.default_rng(0)
    proto, w, ws = _qdq_linear(k, n, rng)
    fp32 = session([h.make_node("MatMul", ["x", "w"], ["y"])], [h.make_tensor_value_info("x", T.FLOAT, ["m", k])],
                   [nh.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")])
    sessions = {"fp32 MatMul (the fp32 build)": (fp32, None)}
    for form in FORMS:
        model = ir.from_proto(onnx.load_from_string(proto))
        lower(model, form)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = 2, 3
        opts.add_session_config_entry(*NO_QDQ_FUSION)
        sessions[f"int8, {form}"] = (ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts,
                                                          providers=["CPUExecutionProvider"]), form)
    chosen, why = select_form()
    print(f"\nint8 linear layer K={k} N={n} in each integer GEMM form, median of {runs} runs (prefill: "
          f"{max(3, runs // 30)}), 2 threads; this CPU's form: {chosen} ({why})\n")
    print("| kernel | decode M=1 (us) | prefill M=512 (ms) | max error relative to the largest output, full-range data |")
    print("|---|---|---|---|")
    for label, (s, form) in sessions.items():
        x1 = (rng.uniform(-2.6, 2.6, (1, k))).astype(np.float32)
        x512 = (rng.uniform(-2.6, 2.6, (512, k))).astype(np.float32)
        decode = best_us(s, {"x": x1}, runs)
        prefill = best_us(s, {"x": x512}, max(3, runs // 30)) / 1000
        error = "-"
        if form is not None:
            got = s.run(None, {"x": x512})[0]
            q = np.clip(np.round(x512 / 0.02), -128, 127)  # the activations as QuantizeLinear makes them
            exact = (q @ w.astype(np.float64)) * 0.02 * ws  # the Q/DQ graph's arithmetic, in float64
            error = f"{np.abs(got - exact).max() / np.abs(exact).max():.1e}"
        print(f"| {label} | {decode:.0f} | {prefill:.1f} | {error} |")


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
