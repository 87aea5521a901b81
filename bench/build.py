"""Build benchmark: `trtglm build --fp16` with TensorRT-RTX on the CPU for random GLM-4-shaped models.

    python bench/build.py [--sizes 100M,400M,1.5B] [--workdir .bench]

For each size: a cold build (fusion + engine for SM89, no cache) and a cache-hit rebuild, each in its
own process with its wall time and peak RSS; engine size; engine kernels per decoder layer in the
prefill and decode profiles.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

from common import checkpoint, config_of, measure, parameters, parse_args

from trtglm.engine.builder import NOT_KERNELS


def main() -> None:
    args = parse_args(__doc__, "100M,400M,1.5B")
    work = args.workdir
    rows = []
    for size in args.sizes:
        config = config_of(size)
        params = parameters(config)
        ckpt, export_dir = checkpoint(work, size), work / f"export-fp16-{size}"
        if not (export_dir / "export.json").exists():
            measure([sys.executable, "-m", "trtglm", "export", str(ckpt), "-o", str(export_dir), "--dtype", "fp16",
                     "--no-validate", "--force"])
        cache = work / f"cache-{size}"
        shutil.rmtree(cache, ignore_errors=True)
        build = [sys.executable, "-m", "trtglm", "build", str(export_dir), "--max-input-len", "512",
                 "--max-seq-len", "2048", "--cache-dir", str(cache), "--force", "--json"]
        cold = measure([*build, "-o", str(work / f"build-{size}")])
        hit = measure([*build, "-o", str(work / f"build-{size}-again")])
        manifest = json.loads(cold["out"])
        assert json.loads(hit["out"])["cache"]["hit"]
        layers = json.loads((work / f"build-{size}" / "layers.json").read_text())["engine_layers"]
        per_profile = {}
        for layer in layers:
            m = re.search(r"_myl(\d+)_\d+$", layer["name"])
            if m and layer["type"] not in NOT_KERNELS:
                per_profile[m.group(1)] = per_profile.get(m.group(1), 0) + 1
        counts = [per_profile[k] for k in sorted(per_profile)]
        L = config["num_hidden_layers"]
        row = {"size": size, "params_m": params / 1e6, "weight_gb": 2 * params / 1e9,
               "build_s": cold["seconds"], "build_rss_gb": cold["peak_rss"] / 1e9,
               "tensorrt_s": manifest["engine"]["tensorrt_build_seconds"],
               "hit_s": hit["seconds"], "hit_rss_gb": hit["peak_rss"] / 1e9,
               "engine_mb": manifest["engine"]["bytes"] / 1e6,
               "kernels_per_layer": [round(c / L, 1) for c in counts[:2]]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        for d in (f"build-{size}", f"build-{size}-again"):
            shutil.rmtree(work / d)
        shutil.rmtree(cache)
    print("\n| model | params | fp16 weights | build s (TensorRT part) | peak RSS | RSS/weights | cache hit s | "
          "engine | kernels/layer (per profile) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['params_m']:.0f}M | {r['weight_gb']:.2f} GB | {r['build_s']:.1f} ({r['tensorrt_s']:.1f}) "
              f"| {r['build_rss_gb']:.2f} GB | {r['build_rss_gb'] / r['weight_gb']:.2f} | {r['hit_s']:.2f} | "
              f"{r['engine_mb']:.0f} MB | {', '.join(map(str, r['kernels_per_layer']))} |")


if __name__ == "__main__":
    main()
