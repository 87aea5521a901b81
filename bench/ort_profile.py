"""Where ONNX Runtime's decode time goes: its own profiler over `trtglm run`'s generation loop on the fused fp32
build of the 136M-parameter random GLM-4 shape of bench/runtime.py (32-token prompt, 64 new tokens).

    python bench/ort_profile.py [--workdir .bench]

Prints kernel time per op type and the MatMul time per generated token next to the time the weights'
bytes need at the measured read bandwidth (why 85% of that bound is out of reach with per-op overhead).
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
    args = ap.parse_args()
    work = Path(args.workdir) / "ort_profile"
    config = glm4_config(hidden=768, layers=12, heads=12, kv_heads=2, intermediate=2560, vocab=32000, head_dim=64,
                         max_positions=2048)
    if not (work / "build" / "manifest.json").exists():
        ckpt = write_random_checkpoint(work / "ckpt", {**config, "torch_dtype": "float32"}, dtype="fp32")
        export(str(ckpt), work / "export", validate=False, max_seq_len=2048, force=True)
        build(work / "export", work / "build", onnx_only=True, force=True)
    import onnxruntime as ort

    backend = OrtBackend.from_build(work / "build")
    opts = ort.SessionOptions()
    opts.enable_profiling, opts.log_severity_level = True, 3
    backend.session = ort.InferenceSession(str(work / "build" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    prompt, new = np.random.default_rng(0).integers(3, 32000, 32).tolist(), 64
    generate(backend, [prompt], max_new_tokens=new)
    trace = backend.session.end_profiling()
    per_op, calls = Counter(), Counter()
    for event in json.load(open(trace)):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
            calls[event["args"]["op_name"]] += 1
    os.remove(trace)
    total = sum(per_op.values())
    print("| op | kernel ms | share | calls |\n|---|---|---|---|")
    for op, us in per_op.most_common(10):
        print(f"| {op} | {us / 1000:.1f} | {us / total:.1%} | {calls[op]} |")
    weights = (work / "build" / "model.onnx.data").stat().st_size - config["vocab_size"] * config["hidden_size"] * 4
    bound_ms = weights / (read_bandwidth_gbs() * 1e9) * 1000
    matmul_ms = per_op["MatMul"] / 1000 / new  # the prompt's prefill is in there too: an upper bound per token
    print(f"\nMatMul kernels {matmul_ms:.1f} ms per generated token (prefill included), other ops "
          f"{(total - per_op['MatMul']) / 1000 / new:.1f} ms; weight bytes at the measured bandwidth: {bound_ms:.1f} ms")


if __name__ == "__main__":
    main()
