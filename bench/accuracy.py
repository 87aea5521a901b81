"""Accuracy of each precision on the shipped model (models/tiny-glm4) against its fp32 export, on the whole
held-out split (trtglm/data/eval.jsonl). Every row is built by `trtglm build --<precision> --onnx-only`
from the one fp32 export, with the default calibration (64 windows of 256 tokens of the calibration split),
and evaluated with ONNX Runtime on the CPU; "fp16 export" is the export written in fp16 directly; the last two
rows quantize the lm_head too (`precision.quantization.lm_head: true`; left in fp16 by default).

    python bench/accuracy.py [--workdir .bench]

bf16 has no row: ONNX Runtime's CPU provider cannot compute it (its engine builds; see the tests).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from trtglm.engine.build import build
from trtglm.export.exporter import export
from trtglm.runtime.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=".bench")
    args = ap.parse_args()
    work = Path(args.workdir) / "accuracy"
    shutil.rmtree(work, ignore_errors=True)
    export(str(ROOT / "models" / "tiny-glm4"), work / "e-fp32", validate=False)
    print("| precision | weights | perplexity | reference | delta | next-token agreement | logits cosine | graph build |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [("fp32", "fp32", None), ("fp16 export", "fp16", "fp16"), *((d, "fp32", d) for d in
                                                                    ("fp16", "int8", "fp8", "int4")),
            *((f"{d}, lm_head quantized", "fp32", d) for d in ("int8", "int4"))]
    for label, exported, dtype in rows:
        source = work / f"e-{exported}"
        if not source.exists():
            export(str(ROOT / "models" / "tiny-glm4"), source, dtype=exported, validate=False)
        out = work / f"b-{label.replace(' ', '-').replace(',', '')}"
        started = time.perf_counter()
        precision = {"dtype": dtype, "quantization": {"lm_head": "lm_head" in label}}
        build(source, out, onnx_only=True,  # perplexity needs every position
              overrides={"shapes": {"logits": "all"}, **({"precision": precision} if dtype else {})})
        seconds = time.perf_counter() - started
        r = evaluate(out, work / "e-fp32", samples=10_000, seq_len=256)
        size = (out / "model.onnx.data").stat().st_size / 1e6
        print(f"| {label} | {size:.1f} MB | {r['candidate_perplexity']:.3f} | {r['reference_perplexity']:.3f} | "
              f"{r['perplexity_delta']:+.3%} | {r['next_token_agreement']:.2%} | {r['logits_cosine']:.6f} | "
              f"{seconds:.1f} s |", flush=True)

if __name__ == "__main__":
    main()
