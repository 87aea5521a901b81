"""Shared by the benchmarks: model shapes, and peak RSS of a child process measured on its own."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

from trtglm.model.config import normalize
from trtglm.model.synthetic import glm4_config, write_random_checkpoint
from trtglm.model.weights import weight_specs

SHAPES = {  # GLM-4 proportions: 2 KV heads, MLP about 3x hidden
    "50M": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1536, vocab=32000),
    "100M": dict(hidden=640, layers=12, heads=10, kv_heads=2, intermediate=2048, vocab=32000),
    "400M": dict(hidden=1024, layers=20, heads=16, kv_heads=2, intermediate=4096, vocab=64000),
    "1.5B": dict(hidden=2048, layers=24, heads=16, kv_heads=2, intermediate=6144, vocab=64000, head_dim=128),
    # GLM-4-9B-0414's shape
    "9B": dict(hidden=4096, layers=40, heads=32, kv_heads=2, intermediate=13696, vocab=151552, head_dim=128),
}

# Runs a command and reports its own wall time and the peak RSS of that child alone.
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": r.returncode, "seconds": time.perf_counter() - t, "err": r.stderr[-500:], "out": r.stdout,
                  "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def config_of(size: str) -> dict:
    return glm4_config(**SHAPES[size])


def parameters(config: dict) -> int:
    return sum(math.prod(s.shape) for s in weight_specs(normalize(config)).values())


def measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["rc"]:
        raise SystemExit(f"{' '.join(cmd)} failed: {result['err']}")
    return result


def parse_args(doc: str, sizes: str, **options: str) -> argparse.Namespace:
    """--sizes, --workdir, and one string option per keyword (name=default)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=sizes, help=f"comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--workdir", default=".bench")
    for name, default in options.items():
        ap.add_argument(f"--{name.replace('_', '-')}", default=default)
    args = ap.parse_args()
    args.workdir = Path(args.workdir)
    args.sizes = args.sizes.split(",")
    return args


def checkpoint(work: Path, size: str) -> Path:
    """The random fp16 checkpoint of `size`, written once and reused by every benchmark."""
    path = work / f"ckpt-{size}"
    if not (path / "config.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        write_random_checkpoint(path, config_of(size), dtype="fp16")
    return path
