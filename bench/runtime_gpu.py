"""Runtime benchmark on a GPU, on the 136M GLM-4-shaped random model of bench/runtime.py, in one run:
trtglm's ONNX Runtime backend on the CUDA provider (onnxruntime-gpu) for fp32 and fp16 exports (the default
build, `--kv-cache static` with and without `--cuda-graphs`, `--logits all`) against transformers `generate`
(sdpa) on the same GPU, at batch 1 and 8; each build's greedy tokens on the CUDA provider against the CPU
provider's (and with CUDA graphs against without); and where a CUDA decode step spends its time (ONNX
Runtime's profile, per operator).

    python bench/runtime_gpu.py [--workdir .bench] [--prompt 128] [--new 128] [--rounds 3]

Needs a GPU, onnxruntime-gpu and a CUDA torch. The TensorRT engine is not here: TensorRT-RTX cannot run on
the H100/H200 this was written on (sm90), and on an RTX GPU `trtglm bench BUILD --backend trt` measures it.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from runtime import arguments, interleaved, model_136m, ort_runner

from trtglm.engine.build import build
from trtglm.export.exporter import export
from trtglm.runtime.backends import OrtBackend
from trtglm.runtime.generate import generate

BUILDS = {"default build": {}, "static KV cache": {"kv_cache": "static"}, "every position's logits": {"logits": "all"}}


def transformers_runner(ckpt: Path, dtype: torch.dtype, prompts: list[list[int]], new: int):
    from transformers import Glm4ForCausalLM

    model = Glm4ForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").cuda().eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor(prompts, device="cuda")

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def run() -> dict:
        timed(4)
        ttft, total = timed(1), timed(new)
        return {"ttft_ms": 1000 * ttft, "decode_tok_s": (new - 1) / (total - ttft), "tokens": None}

    return run


def share_equal(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of token positions where two generations agree."""
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def decode_profile(build_dir: Path, prompt: list[int], prefix: Path) -> tuple[float, dict[str, float]]:
    """Mean decode step (ms) and its milliseconds per operator type, from ONNX Runtime's CUDA profile."""
    backend = OrtBackend.from_build(build_dir, profile=prefix)
    generate(backend, [prompt], max_new_tokens=33)
    events = json.loads(Path(backend.session.end_profiling()).read_text())
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[f"{e['args'].get('op_name')} ({e['args'].get('provider', '?').replace('ExecutionProvider', '')})"] += e["dur"]
    return float(np.mean(runs[1:])) / 1000, {op: d / len(runs) / 1000 for op, d in per_op.items()}


def main() -> None:
    args = arguments(__doc__, prompt=128, new=128)
    if not torch.cuda.is_available():
        raise SystemExit("bench/runtime_gpu.py: needs a GPU and a CUDA build of torch")
    config, ckpt = model_136m(Path(args.workdir) / "runtime_gpu")
    work = ckpt.parent
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(3, 32000, (b, args.prompt)).tolist() for b in (1, 8)}
    runners, agreement, profiles = {}, {}, {}
    for dtype in ("fp32", "fp16"):
        export(str(ckpt), work / f"export-{dtype}", dtype=dtype, validate=False, max_seq_len=512)
        for label, shapes in BUILDS.items():
            out = work / f"build-{dtype}-{label.split()[0]}"
            build(work / f"export-{dtype}", out, onnx_only=True, overrides={"shapes": shapes})
            gpu, cpu = OrtBackend.from_build(out), OrtBackend.from_build(out, device="cpu")
            if gpu.device != "cuda":
                raise SystemExit("bench/runtime_gpu.py: ONNX Runtime has no usable CUDA provider here")
            short = rng.integers(3, 32000, (3, 24)).tolist()
            g, c = (generate(b, short, max_new_tokens=16).tokens for b in (gpu, cpu))
            agreement[f"{dtype} {label}"] = share_equal(g, c)
            variants = {label: gpu}
            if label == "static KV cache":  # decode steps captured and replayed (`--cuda-graphs`)
                variants[f"{label}, CUDA graphs"] = OrtBackend.from_build(out, cuda_graphs=True)
                replayed = generate(variants[f"{label}, CUDA graphs"], short, max_new_tokens=16).tokens
                agreement[f"{dtype} {label}, CUDA graphs (vs without)"] = share_equal(replayed, g)
            for name, backend in variants.items():
                for b, batch_prompts in prompts.items():
                    runners[f"trtglm run --backend ort (cuda), {dtype} export, {name}, batch {b}"] = ort_runner(
                        backend, batch_prompts, args.new)
            if label == "default build":
                profiles[dtype] = decode_profile(out, prompts[1][0], work / f"profile-{dtype}")
    for dtype in (torch.float32, torch.float16):
        for b, batch_prompts in prompts.items():
            name = str(dtype).removeprefix("torch.").replace("float", "fp")
            runners[f"transformers generate (sdpa, {name}, cuda), batch {b}"] = transformers_runner(
                ckpt, dtype, batch_prompts, args.new)
    rows = interleaved(runners, args.rounds)
    print(f"\n{torch.cuda.get_device_name(0)}; prompt {args.prompt} tokens, {args.new} new; median of {args.rounds} rounds")
    print(f"{'runner':86s} {'TTFT ms':>8s} {'tok/s/row':>10s}")
    for label, r in rows.items():
        print(f"{label:86s} {r['ttft_ms']:8.1f} {r['decode_tok_s']:10.0f}")
    print("\ngreedy tokens equal, CUDA provider vs CPU provider (3 prompts x 16 tokens):")
    for label, share in agreement.items():
        print(f"  {label:50s} {share:.0%}")
    for dtype, (step, per_op) in profiles.items():
        print(f"\n{dtype} default build, one decode step on the CUDA provider: {step:.2f} ms; by operator:")
        for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:8]:
            print(f"  {op:40s} {ms:6.3f} ms")


if __name__ == "__main__":
    main()
