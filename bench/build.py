"""Build benchmark: `trtglm build` with TensorRT-RTX on the CPU for random GLM-4-shaped models.

    python bench/build.py [--sizes 100M,400M,1.5B] [--budgets none,none,none] [--dtypes fp16,fp16,fp16]
                          [--calibration-samples 8] [--workdir .bench]

For each size: a cold build (fusion + engine for SM89, no cache) within its memory budget (`--max-memory`;
`none`: the whole graph in one engine, whatever the memory available) and a cache-hit rebuild, each in its
own process with its wall time and the peak RSS of the largest process (a staged build's stage builds are
processes of their own); stages; engine size; engine kernels per decoder layer in the prefill and decode
profiles. `--sizes 9B --budgets 12G` is GLM-4-9B-0414's shape (18.8 GB of fp16 weights; the checkpoint is
deleted once exported, so that export and build fit on a disk of about 60 GB). An fp16 or bf16 build starts
from an export in that dtype; int8, int4 and fp8 from an fp32 export (calibrating on `--calibration-samples`
windows of 256 tokens, where the precision calibrates: memory and time, not accuracy, are what this measures).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from common import checkpoint, config_of, measure, parameters, parse_args

from trtglm.engine.builder import NOT_KERNELS
from trtglm.engine.directory import BuildDir

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "tiny-glm4"


def main() -> None:
    args = parse_args(__doc__, "100M,400M,1.5B", budgets="", dtypes="", calibration_samples="8")
    work = args.workdir
    budgets = args.budgets.split(",") if args.budgets else ["none"] * len(args.sizes)
    dtypes = args.dtypes.split(",") if args.dtypes else ["fp16"] * len(args.sizes)
    rows = []
    for size, budget, dtype in zip(args.sizes, budgets, dtypes, strict=True):
        config = config_of(size)
        params = parameters(config)
        exported = dtype if dtype in ("fp16", "bf16") else "fp32"
        export_dir = work / f"export-{exported}-{size}"
        if not (export_dir / "export.json").exists():
            ckpt = checkpoint(work, size)
            for name in ("tokenizer.json", "tokenizer_config.json"):  # calibration text for int8/fp8: its ids fit
                shutil.copy2(SHIPPED / name, ckpt / name)
            run = measure([sys.executable, "-m", "trtglm", "export", str(ckpt), "-o", str(export_dir), "--dtype",
                           exported, "--no-validate", "--force"])
            print(json.dumps({"size": size, "dtype": exported, "export_s": run["seconds"],
                              "export_rss_gb": run["peak_rss"] / 1e9}), flush=True)
            if size == "9B":
                shutil.rmtree(ckpt)
        cache = work / f"cache-{size}"
        shutil.rmtree(cache, ignore_errors=True)
        recipe = work / f"recipe-{dtype}.yaml"
        recipe.write_text(f"precision:\n  dtype: {dtype}\ncalibration:\n  samples: {args.calibration_samples}\n"
                          "  seq_len: 256\n")
        build = [sys.executable, "-m", "trtglm", "build", str(export_dir), "--recipe", str(recipe),
                 "--max-input-len", "512", "--max-seq-len", "2048", "--cache-dir", str(cache), "--force", "--json",
                 "--max-memory", "1T" if budget == "none" else budget]
        cold = measure([*build, "-o", str(work / f"build-{size}")])
        hit = measure([*build, "-o", str(work / f"build-{size}-again")])
        manifest = json.loads(cold["out"])
        assert json.loads(hit["out"])["cache"]["hit"]
        stages = manifest.get("stages") or []
        layers = BuildDir(work / f"build-{size}").layers()
        per_profile = {}
        for layer in layers:
            m = re.search(r"_myl(\d+)_\d+$", layer["name"])
            if m and layer["type"] not in NOT_KERNELS:
                per_profile[m.group(1)] = per_profile.get(m.group(1), 0) + 1
        counts = [per_profile[k] for k in sorted(per_profile)]  # a staged build: every stage's, summed
        L = config["num_hidden_layers"]
        row = {"size": size, "dtype": dtype, "params_m": params / 1e6, "weight_gb": 2 * params / 1e9,
               "budget": budget, "export_gb": sum(f.stat().st_size for f in export_dir.iterdir()) / 1e9,
               "stages": max(1, len(stages)), "build_s": cold["seconds"], "build_rss_gb": cold["peak_rss"] / 1e9,
               "stage_rss_gb": max((s["engine"]["peak_rss_bytes"] for s in stages), default=0) / 1e9,
               # the build process's peak so far after each stage's graph steps (cut and fusion, conversion)
               "graph_rss_gb": [round(max((s.get("graph_peak_rss_bytes") or {}).values(), default=0) / 1e9, 2)
                                for s in stages],
               "tensorrt_s": manifest["engine"]["tensorrt_build_seconds"],
               "hit_s": hit["seconds"], "hit_rss_gb": hit["peak_rss"] / 1e9,
               "engine_mb": manifest["engine"]["bytes"] / 1e6,
               "kernels_per_layer": [round(c / L, 1) for c in counts[:2]]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        for d in (f"build-{size}", f"build-{size}-again"):
            shutil.rmtree(work / d)
        shutil.rmtree(cache)
    print("\n| model | precision | params | fp16 weights | budget | stages | build s (TensorRT part) | s per GB | peak RSS "
          "(largest process) | RSS/weights | largest stage build | cache hit s | engine | kernels/layer (per profile) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        stage = f"{r['stage_rss_gb']:.2f} GB" if r["stages"] > 1 else "-"
        print(f"| {r['size']} | {r['dtype']} | {r['params_m']:.0f}M | {r['weight_gb']:.2f} GB | {r['budget']} | "
              f"{r['stages']} | "
              f"{r['build_s']:.1f} ({r['tensorrt_s']:.1f}) | {r['build_s'] / r['weight_gb']:.1f} | "
              f"{r['build_rss_gb']:.2f} GB | {r['build_rss_gb'] / r['weight_gb']:.2f} | {stage} | {r['hit_s']:.2f} | "
              f"{r['engine_mb']:.0f} MB | {', '.join(map(str, r['kernels_per_layer']))} |")


if __name__ == "__main__":
    main()
