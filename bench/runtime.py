"""Runtime benchmark on a random-weight GLM-4-shaped model of about 136M parameters, in one run:
decode tokens/s and time to first token of trtglm's ONNX Runtime backend for fp32 and fp16 exports
(the default build, whose lm_head reads the last position only, and with `--kv-cache static`; fp32 also
with `--logits all`, the lm_head on every position) and for the fp16, int8 and int4 builds of
the fp32 export (`trtglm build --fp16|--int8|--int4`; int8 and int4 also with the lm_head quantized; int8
in every integer GEMM form, integer_gemm.py, marked where the form is not exact on this CPU),
against transformers `generate` (sdpa) on the same weights, and each row's read-bandwidth limit
(measured bandwidth / weight bytes read per token).

    python bench/runtime.py [--workdir .bench] [--prompt 32] [--new 64] [--rounds 3]

Every runner is timed in turn, three rounds over, and each figure is the median of its rounds.

Calibration reads the shipped calibration text with the shipped model's tokenizer (its ids fit this
vocabulary): the weights are random, so only speed means anything here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from trtglm.engine.build import build
from trtglm.export.exporter import export
from trtglm.model.synthetic import glm4_config, write_random_checkpoint
from trtglm.runtime.backends import OrtBackend
from trtglm.runtime.generate import generate
from trtglm.runtime.integer_gemm import FORMS, select_form


def read_bandwidth_gbs(threads: int = 2, mb: int = 512) -> float:
    torch.set_num_threads(threads)
    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(10))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def transformers_runner(ckpt: Path, prompt: list[int], new: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])

    def run() -> dict:
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - t
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            total = time.perf_counter() - t
        return {"ttft_ms": 1000 * ttft, "decode_tok_s": (new - 1) / (total - ttft), "tokens": out[0, len(prompt):].tolist()}

    return run


def ort_runner(backend: OrtBackend, prompts: list[list[int]], new: int):
    def run() -> dict:
        generate(backend, prompts, max_new_tokens=4)
        r = generate(backend, prompts, max_new_tokens=new)
        return {"ttft_ms": 1000 * r.prefill_seconds, "decode_tok_s": r.decode_tokens_per_second, "tokens": r.tokens[0]}

    return run


def interleaved(runners: dict, rounds: int) -> dict[str, dict]:
    """Each runner in turn, `rounds` times over; the median of each figure (this shared machine drifts by
    20-30% within minutes: rows timed one after the other are not comparable)."""
    results = {label: [] for label in runners}
    for _ in range(rounds):
        for label, run in runners.items():
            results[label].append(run())
            print(json.dumps({label: results[label][-1] | {"tokens": None}}), flush=True)
    return {label: {"ttft_ms": statistics.median(r["ttft_ms"] for r in rs),
                    "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs), "tokens": rs[0]["tokens"]}
            for label, rs in results.items()}


def arguments(doc: str, prompt: int, new: int) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=".bench")
    ap.add_argument("--prompt", type=int, default=prompt)
    ap.add_argument("--new", type=int, default=new)
    ap.add_argument("--rounds", type=int, default=3)
    return ap.parse_args()


def model_136m(work: Path) -> tuple[dict, Path]:
    """The issue's random-weight GLM-4 shape (hidden 768, 12 layers, 12/2 heads, vocab 32000), in a fresh WORK."""
    shutil.rmtree(work, ignore_errors=True)
    config = glm4_config(hidden=768, layers=12, heads=12, kv_heads=2, intermediate=2560, vocab=32000, head_dim=64,
                         max_positions=2048)
    return config, write_random_checkpoint(work / "ckpt", {**config, "torch_dtype": "float32"}, dtype="fp32")


def main() -> None:
    args = arguments(__doc__, prompt=32, new=64)
    work = Path(args.workdir) / "runtime"
    config, ckpt = model_136m(work)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # for calibration only
        shutil.copy2(Path(__file__).resolve().parent.parent / "models" / "tiny-glm4" / name, ckpt / name)
    prompt = np.random.default_rng(0).integers(3, 32000, args.prompt).tolist()
    runners = {"transformers generate (sdpa, fp32)": transformers_runner(ckpt, prompt, args.new)}
    weight_bytes, read = {}, {}
    for dtype in ("fp32", "fp16"):
        export(str(ckpt), work / f"export-{dtype}", dtype=dtype, validate=False, max_seq_len=2048)
        weight_bytes[dtype] = (work / f"export-{dtype}" / "model.onnx.data").stat().st_size
        for label, variant, shapes in (("default build", "default", {}),
                                       ("static KV cache", "static", {"kv_cache": "static"}),
                                       ("default build, every position's logits", "all", {"logits": "all"})):
            if variant == "all" and dtype != "fp32":
                continue
            out = work / f"build-{dtype}-{variant}"
            build(work / f"export-{dtype}", out, onnx_only=True, overrides={"shapes": shapes})
            label = f"trtglm run --backend ort, {dtype} export, {label}"
            runners[label] = ort_runner(OrtBackend.from_build(out), [prompt], args.new)
            read[label] = weight_bytes[dtype]
    read["transformers generate (sdpa, fp32)"] = weight_bytes["fp32"]
    for dtype, lm_head in (("fp16", False), ("int8", False), ("int4", False), ("int8", True), ("int4", True)):
        out = work / f"build-{dtype}-from-fp32{'-lm-head' if lm_head else ''}"
        build(work / "export-fp32", out, onnx_only=True,
              overrides={"precision": {"dtype": dtype, "quantization": {"lm_head": lm_head}},
                         "calibration": {"samples": 16, "seq_len": 128}})
        label = f"trtglm run --backend ort, `build --{dtype}` of the fp32 export{', lm_head quantized' if lm_head else ''}"
        forms = [None] if dtype != "int8" or lm_head else FORMS
        for form in forms:
            backend = OrtBackend.from_build(out, int8_gemm=form)
            saturates = form == "u8s8" and select_form()[0] != "u8s8"
            row = f"{label}, {form} GEMMs{' (not exact on this CPU)' if saturates else ''}" if form else label
            runners[row] = ort_runner(backend, [prompt], args.new)
            # dequantize: ONNX Runtime folds the weights into fp32 at load
            read[row] = weight_bytes["fp32"] if form == "dequantize" else (out / "model.onnx.data").stat().st_size
    rows = interleaved(runners, args.rounds)
    bandwidth = read_bandwidth_gbs()
    embedding = config["vocab_size"] * config["hidden_size"]  # one row of it is read per token
    per_token = {label: n - embedding * (4 if n == weight_bytes["fp32"] else 2) for label, n in read.items()}
    base = rows["transformers generate (sdpa, fp32)"]
    print(f"\nint8 GEMM form chosen on this CPU: {' '.join(select_form())}")
    print(f"read bandwidth {bandwidth:.1f} GB/s (2 threads); weights read per token = the graph's weights but the "
          f"embedding table (fp32 {per_token[next(iter(rows))] / 1e6:.0f} MB)\n")
    print("| runner | weights read per token | time to first token (ms) | decode tok/s | vs transformers "
          "| of its bandwidth limit | tokens = transformers |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        limit = bandwidth * 1e9 / per_token[label]
        print(f"| {label} | {per_token[label] / 1e6:.0f} MB | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} "
              f"| x{r['decode_tok_s'] / base['decode_tok_s']:.2f} | {r['decode_tok_s'] / limit:.0%} "
              f"| {'yes' if r['tokens'] == base['tokens'] else 'no'} |")


if __name__ == "__main__":
    main()
