"""Where ONNX Runtime's time goes, from its own profiler, on the 136M-parameter random GLM-4 shape of
bench/runtime.py (fp32).

    python bench/ort_profile.py [--workdir .bench] [--phase decode|prefill]

decode: `trtglm run`'s generation loop on the fused build (32-token prompt, 64 new tokens); prints kernel
time per op type and the MatMul time per generated token next to the time the weights' bytes need at the
measured read bandwidth (why 85% of that bound is out of reach with per-op overhead).
prefill: one 512-token prefill of the plain export and of the fused build, each after a warm-up; prints
kernel time per op type of both and the most any fusion could gain there (total / MatMul kernel time:
what is left if every other op took no time at all).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from runtime import read_bandwidth_gbs
from trtglm.backends import OrtBackend
from trtglm.build import build
from trtglm.export import export
from trtglm.generate import generate
from trtglm.synthetic import glm4_config, write_random_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=".bench")
    ap.add_argument("--phase", choices=["decode", "prefill"], default="decode")
    args = ap.parse_args()
    work = Path(args.workdir) / "ort_profile"
    config = glm4_config(hidden=768, layers=12, heads=12, kv_heads=2, intermediate=2560, vocab=32000, head_dim=64,
                         max_positions=2048)
    if not (work / "build" / "manifest.json").exists():
        ckpt = write_random_checkpoint(work / "ckpt", {**config, "torch_dtype": "float32"}, dtype="fp32")
        export(str(ckpt), work / "export", validate=False, max_seq_len=2048, force=True)
        build(work / "export", work / "build", onnx_only=True, force=True)
    if args.phase == "prefill":
        return prefill(work, config)
    backend = profiled(work / "build" / "model.onnx", work / "build")
    prompt, new = np.random.default_rng(0).integers(3, 32000, 32).tolist(), 64
    generate(backend, [prompt], max_new_tokens=new)
    per_op, calls = kernel_times(backend)
    total = sum(per_op.values())
    table(per_op, calls)
    weights = (work / "build" / "model.onnx.data").stat().st_size - config["vocab_size"] * config["hidden_size"] * 4
    bound_ms = weights / (read_bandwidth_gbs() * 1e9) * 1000
    matmul_ms = per_op["MatMul"] / 1000 / new  # the prompt's prefill is in there too: an upper bound per token
    print(f"\nMatMul kernels {matmul_ms:.1f} ms per generated token (prefill included), other ops "
          f"{(total - per_op['MatMul']) / 1000 / new:.1f} ms; weight bytes at the measured bandwidth: {bound_ms:.1f} ms")


def prefill(work: Path, config: dict, tokens: int = 512) -> None:
    ids = np.random.default_rng(0).integers(3, config["vocab_size"], (1, tokens))
    feeds = (ids, np.ones((1, tokens), np.int64), np.arange(tokens)[None])
    for label, path in (("plain export", work / "export" / "model.onnx"), ("fused build", work / "build" / "model.onnx")):
        backend = OrtBackend(path)
        backend.forward(*feeds, backend.new_cache(1))  # warm-up, unprofiled
        backend = profiled(path, None)
        backend.forward(*feeds, backend.new_cache(1))
        per_op, calls = kernel_times(backend)
        total = sum(per_op.values())
        print(f"\n{label}: {tokens}-token prefill, kernels {total / 1000:.0f} ms, MatMul {per_op['MatMul'] / 1000:.0f} ms "
              f"({per_op['MatMul'] / total:.0%}); at most x{total / per_op['MatMul']:.2f} faster with every other op free")
        table(per_op, calls)


def profiled(path: Path, build_dir: Path | None) -> OrtBackend:
    """A backend whose session records ONNX Runtime's profile."""
    import onnxruntime as ort

    backend = OrtBackend.from_build(build_dir) if build_dir else OrtBackend(path)
    opts = ort.SessionOptions()
    opts.enable_profiling, opts.log_severity_level = True, 3
    backend.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return backend


def kernel_times(backend: OrtBackend) -> tuple[Counter, Counter]:
    """Microseconds and calls per op type, from the session's profile (which is then deleted)."""
    trace = backend.session.end_profiling()
    per_op, calls = Counter(), Counter()
    for event in json.load(open(trace)):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
            calls[event["args"]["op_name"]] += 1
    os.remove(trace)
    return per_op, calls


def table(per_op: Counter, calls: Counter) -> None:
    total = sum(per_op.values())
    print("| op | kernel ms | share | calls |\n|---|---|---|---|")
    for op, us in per_op.most_common(10):
        print(f"| {op} | {us / 1000:.1f} | {us / total:.1%} | {calls[op]} |")

if __name__ == "__main__":
    main()
