"""Accuracy of each precision on the shipped model (models/tiny-glm4) against its fp32 export, on the whole
held-out split (calibration_data/eval.jsonl).

    python bench/accuracy.py [--workdir .bench]

int8, int4 and fp8 rows join when the precision stage lands; bf16 needs a GPU (ONNX Runtime's CPU
provider cannot run it).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from trtglm.build import build
from trtglm.evaluate import evaluate
from trtglm.export import export

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=".bench")
    args = ap.parse_args()
    work = Path(args.workdir) / "accuracy"
    shutil.rmtree(work, ignore_errors=True)
    export(str(ROOT / "models" / "tiny-glm4"), work / "e-fp32", validate=False)
    print("| precision | weights | perplexity | reference | delta | next-token agreement | logits cosine |")
    print("|---|---|---|---|---|---|---|")
    for dtype in ("fp32", "fp16"):
        if dtype != "fp32":
            export(str(ROOT / "models" / "tiny-glm4"), work / f"e-{dtype}", dtype=dtype, validate=False)
        build(work / f"e-{dtype}", work / f"b-{dtype}", onnx_only=True)
        r = evaluate(work / f"b-{dtype}", work / "e-fp32", ROOT / "calibration_data" / "eval.jsonl",
                     samples=10_000, seq_len=256)
        size = (work / f"b-{dtype}" / "model.onnx.data").stat().st_size / 1e6
        print(f"| {dtype} | {size:.1f} MB | {r['candidate_perplexity']:.3f} | {r['reference_perplexity']:.3f} | "
              f"{r['perplexity_delta']:+.3%} | {r['next_token_agreement']:.2%} | {r['logits_cosine']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
