"""Cost of the precision stage: `trtglm build --<mode> --onnx-only` of a random-weight fp32 export, each build
in its own process (wall time, peak RSS of that process), against the graph build without conversion.

    python bench/precision.py [--sizes 100M,400M] [--modes fp16,int8,int4,fp8] [--workdir .bench]

Calibration: 4 windows of 64 tokens of the shipped calibration text (the shipped model's tokenizer: its
ids fit these vocabularies); the weights are random, so only time and memory mean anything here.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from common import checkpoint, config_of, measure, parameters, parse_args

from trtglm.export.exporter import DATA_FILE, export

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "tiny-glm4"


def main() -> None:
    args = parse_args(__doc__, "100M,400M", modes="fp16,int8,int4,fp8")
    root = args.workdir / "precision"
    print("| model | params | fp32 weights | mode | seconds | peak RSS | RSS / fp32 weights |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        export_dir = root / f"export-{size}"
        if not (export_dir / "export.json").exists():
            ckpt = checkpoint(args.workdir, size)
            for name in ("tokenizer.json", "tokenizer_config.json"):  # for calibration only
                shutil.copy2(SHIPPED / name, ckpt / name)
            export(str(ckpt), export_dir, dtype="fp32", validate=False, max_seq_len=1024, force=True)
        weights = (export_dir / DATA_FILE).stat().st_size
        for mode in ["fp32", *args.modes.split(",")]:
            out = root / f"build-{size}-{mode}"
            cmd = [sys.executable, "-m", "trtglm", "build", str(export_dir), "-o", str(out), "--onnx-only", "--force",
                   "--no-cache", f"--{mode}", "--calib-samples", "4", "--calib-seq-len", "64",
                   "--cache-dir", str(root / "cache")]
            r = measure(cmd)
            print(f"| {size} | {parameters(config_of(size)) / 1e6:.0f}M | {weights / 1e9:.2f} GB | {mode} "
                  f"| {r['seconds']:.1f} | {r['peak_rss'] / 1e9:.2f} GB | {r['peak_rss'] / weights:.2f} |", flush=True)
            shutil.rmtree(root / "cache" / "calibration", ignore_errors=True)  # every run calibrates


if __name__ == "__main__":
    main()
