"""The engine path on a real GPU, in one command: export the shipped model, build an fp16 engine for this GPU's
compute capability with each KV cache, run it with trtglm's TensorRT runner (and CUDA graphs where the module
has them), and compare every step's logits and greedy tokens with ONNX Runtime over the same build.

    pip install 'trtglm[cuda]'   # pycuda (compiles: needs nvcc and the CUDA headers)
    python bench/gpu_check.py [--workdir .bench/gpu-check] [--tolerance 0.02]

Prints what ran (GPU, TensorRT module and version, each configuration) and exits 1 if a comparison fails.
TensorRT-RTX runs on RTX GPUs (sm75-sm121 but sm90/sm100); on a data-center GPU install the full TensorRT
(`pip install 'trtglm[trt]'`), which builds for the GPU it runs on.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from trtglm.core.errors import TrtglmError
from trtglm.engine.build import build
from trtglm.engine.tensorrt import gpu_compute_capability, import_backend
from trtglm.export.exporter import export
from trtglm.model.tokenizer import load_text
from trtglm.runtime.backends import OrtBackend
from trtglm.runtime.compare import compare_backends
from trtglm.runtime.trt import TrtBackend, cuda_graph_refusal, unavailable_reason

MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-glm4"
PROMPTS = ["In the beginning", "And the LORD said unto Moses,", "Blessed are the"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=".bench/gpu-check")
    ap.add_argument("--tolerance", type=float, default=2e-2)
    args = ap.parse_args()
    cc = gpu_compute_capability()
    if cc is None:
        print("no GPU (nvidia-smi found none): nothing to check")
        return 1
    trt = import_backend("auto")
    print(f"GPU {cc}, {trt.__name__} {trt.__version__}")
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    export(str(MODEL), work / "export", dtype="fp16", max_seq_len=512)
    text = load_text(work / "export")
    prompts = [text.encode(p) for p in PROMPTS]
    failed = 0
    for kv_cache in ("dynamic", "static"):
        out = work / f"build-{kv_cache}"
        try:
            build(work / "export", out, use_cache=False, overrides={
                "builder": {"targets": (cc,)}, "shapes": {"max_batch": 3, "kv_cache": kv_cache}})
        except TrtglmError as e:
            print(f"{kv_cache} cache: no engine for {cc}: {e}")
            return 1
        reason = unavailable_reason(out)
        if reason:
            print(f"{kv_cache} cache: the engine cannot run here: {reason}")
            return 1
        reference = OrtBackend.from_build(out, device="cpu")
        graphs = [False] + ([True] if kv_cache == "static" and cuda_graph_refusal(trt) is None else [])
        for cuda_graphs in graphs:
            engine = TrtBackend(out, cuda_graphs=cuda_graphs)
            result = compare_backends(engine, reference, prompts, new_tokens=16, tolerance=args.tolerance)
            engine.close()
            ok = result.passed(args.tolerance)
            failed += not ok
            print(f"{kv_cache} cache{', CUDA graphs' if cuda_graphs else ''}: {'PASS' if ok else 'FAIL'}: "
                  f"{result.steps} steps, max logit difference {result.max_logit_diff:.2e} of the logit scale "
                  f"(tolerance {args.tolerance:g}), greedy tokens equal at {result.agreed} of {result.decided} "
                  "steps without a near tie")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
