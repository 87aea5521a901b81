"""Export benchmark: wall time and peak RSS of `trtglm export --dtype fp16` on random GLM-4-shaped models.

    python bench/export.py [--sizes 50M,400M,1.5B] [--workdir .bench]

Each export runs in its own process (peak RSS is that process's alone), with and without the
ONNX Runtime vs transformers validation. Goal: peak RSS at most 2x the fp16 weight bytes, time
growing linearly with size.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

from trtglm.config import normalize
from trtglm.synthetic import glm4_config, write_random_checkpoint
from trtglm.weights import weight_specs

SHAPES = {  # GLM-4 proportions: 2 KV heads, MLP about 3x hidden
    "50M": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1536, vocab=32000),
    "400M": dict(hidden=1024, layers=20, heads=16, kv_heads=2, intermediate=4096, vocab=64000),
    "1.5B": dict(hidden=2048, layers=24, heads=16, kv_heads=2, intermediate=6144, vocab=64000, head_dim=128),
}

# Runs a command and reports its own wall time and the peak RSS of that child alone.
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": r.returncode, "seconds": time.perf_counter() - t, "err": r.stderr[-500:],
                  "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["rc"]:
        raise SystemExit(f"{' '.join(cmd)} failed: {result['err']}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SHAPES))
    ap.add_argument("--workdir", default=".bench")
    args = ap.parse_args()
    work = Path(args.workdir)
    rows = []
    for size in args.sizes.split(","):
        config = glm4_config(**SHAPES[size])
        params = sum(math.prod(s.shape) for s in weight_specs(normalize(config)).values())
        weight_bytes = 2 * params
        ckpt = work / f"ckpt-{size}"
        if not (ckpt / "config.json").exists():
            shutil.rmtree(ckpt, ignore_errors=True)
            write_random_checkpoint(ckpt, config, dtype="fp16")
        row = {"size": size, "params_m": params / 1e6, "weight_gb": weight_bytes / 1e9}
        for label, extra in (("export", ["--no-validate"]), ("export+validate", [])):
            out = work / f"export-{size}"
            r = measure([sys.executable, "-m", "trtglm", "export", str(ckpt), "-o", str(out), "--dtype", "fp16",
                         "--force", *extra])
            row[label] = {"seconds": r["seconds"], "peak_rss_gb": r["peak_rss"] / 1e9,
                          "rss_over_weights": r["peak_rss"] / weight_bytes}
            shutil.rmtree(out)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print("| model | params | fp16 weights | export s | peak RSS | RSS/weights | +validate s | peak RSS | RSS/weights |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["export"], r["export+validate"]
        print(f"| {r['size']} | {r['params_m']:.0f}M | {r['weight_gb']:.2f} GB | {a['seconds']:.1f} | "
              f"{a['peak_rss_gb']:.2f} GB | {a['rss_over_weights']:.2f} | {b['seconds']:.1f} | "
              f"{b['peak_rss_gb']:.2f} GB | {b['rss_over_weights']:.2f} |")


if __name__ == "__main__":
    main()
