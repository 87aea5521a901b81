"""Export benchmark: wall time and peak RSS of `trtglm export --dtype fp16` on random GLM-4-shaped models.

    python bench/export.py [--sizes 50M,400M,1.5B] [--workdir .bench]

Each export runs in its own process (peak RSS is that process's alone), with and without the
ONNX Runtime vs transformers validation. Goal: peak RSS at most 2x the fp16 weight bytes, time
growing linearly with size.
"""

from __future__ import annotations

import json
import shutil
import sys

from common import checkpoint, config_of, measure, parameters, parse_args


def main() -> None:
    args = parse_args(__doc__, "50M,400M,1.5B")
    work = args.workdir
    rows = []
    for size in args.sizes:
        config = config_of(size)
        params = parameters(config)
        weight_bytes = 2 * params
        ckpt = checkpoint(work, size)
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
