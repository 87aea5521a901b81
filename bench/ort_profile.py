"""Where ONNX Runtime's time goes, from its own profiler, on the 136M-parameter random GLM-4 shape of
bench/runtime.py (fp32).

    python bench/ort_profile.py [--workdir .bench] [--phase decode|prefill] [--dtype fp32|int8|int4]

decode: `trtglm run`'s generation loop on the fused build of `--dtype` (32-token prompt, 64 new tokens; int8 and
int4 are `build --int8|--int4` of the fp32 export, as in bench/runtime.py); prints kernel
time per op type and the MatMul time per generated token next to the time the weights' bytes need at the
measured read bandwidth (why 85% of that bound is out of reach with per-op overhead).
prefill: one 512-token prefill of the plain export, of the fused build (by default the lm_head and the last layer on
the last position only) and of the fused build with `--logits all`, each after a warm-up in the same session; prints
kernel time per op type of both and the most any fusion could gain there (total / MatMul kernel time:
what is left if every other op took no time at all).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from runtime import read_bandwidth_gbs

from trtglm.engine.build import build
from trtglm.export.exporter import export
from trtglm.model.synthetic import glm4_config, write_random_checkpoint
from trtglm.runtime.backends import OrtBackend
from trtglm.runtime.generate import generate

GEMMS = ("MatMul", "MatMulIntegerToFloat", "MatMulNBits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=".bench")
    ap.add_argument("--phase", choices=["decode", "prefill"], default="decode")
    ap.add_argument("--dtype", choices=["fp32", "int8", "int4"], default="fp32", help="decode: which build")
    args = ap.parse_args()
    work = Path(args.workdir) / "ort_profile"
    config = glm4_config(hidden=768, layers=12, heads=12, kv_heads=2, intermediate=2560, vocab=32000, head_dim=64,
                         max_positions=2048)
    if not (work / "export" / "export.json").exists():
        ckpt = write_random_checkpoint(work / "ckpt", {**config, "torch_dtype": "float32"}, dtype="fp32")
        for name in ("tokenizer.json", "tokenizer_config.json"):  # for calibration only (as bench/runtime.py)
            shutil.copy2(Path(__file__).resolve().parent.parent / "models" / "tiny-glm4" / name, ckpt / name)
        export(str(ckpt), work / "export", validate=False, max_seq_len=2048, force=True)
    build(work / "export", work / "build", onnx_only=True, force=True)  # every run: the defaults of this trtglm
    if args.phase == "prefill":
        return prefill(work, config)
    build_dir = work / "build"
    if args.dtype != "fp32":
        build_dir = work / f"build-{args.dtype}"
        build(work / "export", build_dir, onnx_only=True, force=True,
              overrides={"precision": {"dtype": args.dtype}, "calibration": {"samples": 16, "seq_len": 128}})
    backend = OrtBackend.from_build(build_dir, profile=work / "ort-profile")
    prompt, new = np.random.default_rng(0).integers(3, 32000, 32).tolist(), 64
    generate(backend, [prompt], max_new_tokens=new)
    per_op, calls = kernel_times(backend)
    total = sum(per_op.values())
    table(per_op, calls)
    embedding = config["vocab_size"] * config["hidden_size"] * (4 if args.dtype == "fp32" else 2)
    weights = (build_dir / "model.onnx.data").stat().st_size - embedding
    bound_ms = weights / (read_bandwidth_gbs() * 1e9) * 1000
    gemm_ms = sum(per_op[op] for op in GEMMS) / 1000 / new  # the prompt's prefill is in there too: an upper bound
    print(f"\nGEMM kernels ({', '.join(op for op in GEMMS if per_op[op])}) {gemm_ms:.1f} ms per generated token "
          f"(prefill included), other ops {total / 1000 / new - gemm_ms:.1f} ms; weight bytes at the measured "
          f"bandwidth: {bound_ms:.1f} ms")


def prefill(work: Path, config: dict, tokens: int = 512) -> None:
    ids = np.random.default_rng(0).integers(3, config["vocab_size"], (1, tokens))
    feeds = (ids, np.ones((1, tokens), np.int64), np.arange(tokens)[None])
    every = work / "build-all"
    build(work / "export", every, onnx_only=True, force=True, overrides={"shapes": {"logits": "all"}})
    for label, path in (("plain export", work / "export" / "model.onnx"), ("fused build", work / "build" / "model.onnx"),
                        ("fused build, --logits all", every / "model.onnx")):
        backend = OrtBackend(path, profile=work / "ort-profile")
        for _ in range(2):  # a warm-up (the first run sizes the memory arena), then the one counted
            backend.forward(*feeds, backend.new_cache(1))
        per_op, calls = kernel_times(backend, last_run_only=True)
        total = sum(per_op.values())
        print(f"\n{label}: {tokens}-token prefill, kernels {total / 1000:.0f} ms, MatMul {per_op['MatMul'] / 1000:.0f} ms "
              f"({per_op['MatMul'] / total:.0%}); at most x{total / per_op['MatMul']:.2f} faster with every other op free")
        table(per_op, calls)


def kernel_times(backend: OrtBackend, last_run_only: bool = False) -> tuple[Counter, Counter]:
    """Microseconds and calls per op type, from the session's profile (which is then deleted): of every run, or of
    the last one only."""
    trace = backend.session.end_profiling()
    events = json.load(open(trace))
    since = max(e["ts"] for e in events if e["name"] == "model_run") if last_run_only else 0
    per_op, calls = Counter(), Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= since:
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
