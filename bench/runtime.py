"""Runtime benchmark on a random-weight GLM-4-shaped model of about 136M parameters, in one run:
decode tokens/s and time to first token of trtglm's ONNX Runtime backend for fp32 and fp16 builds
(default fusions, and all fusions including key rotation), against transformers `generate` (sdpa)
on the same weights, and the fp32 read-bandwidth limit (measured bandwidth / weight bytes per token).

    python bench/runtime.py [--workdir .bench] [--prompt 32] [--new 64]

int8 and int4 builds join when the precision stage lands.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from trtglm.backends import OrtBackend
from trtglm.build import build
from trtglm.export import export
from trtglm.generate import generate
from trtglm.synthetic import glm4_config, write_random_checkpoint


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


def transformers_speed(ckpt: Path, prompt: list[int], new: int) -> dict:
    from transformers import Glm4ForCausalLM

    model = Glm4ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        total = time.perf_counter() - t
    return {"ttft_ms": 1000 * ttft, "decode_tok_s": (new - 1) / (total - ttft), "tokens": out[0, len(prompt):].tolist()}


def ort_speed(build_dir: Path, prompt: list[int], new: int) -> dict:
    backend = OrtBackend.from_build(build_dir)
    generate(backend, [prompt], max_new_tokens=4)
    r = generate(backend, [prompt], max_new_tokens=new)
    return {"ttft_ms": 1000 * r.prefill_seconds, "decode_tok_s": r.decode_tokens_per_second, "tokens": r.tokens[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=".bench")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    work = Path(args.workdir) / "runtime"
    shutil.rmtree(work, ignore_errors=True)
    config = glm4_config(hidden=768, layers=12, heads=12, kv_heads=2, intermediate=2560, vocab=32000, head_dim=64,
                         max_positions=2048)
    ckpt = write_random_checkpoint(work / "ckpt", {**config, "torch_dtype": "float32"}, dtype="fp32")
    prompt = np.random.default_rng(0).integers(3, 32000, args.prompt).tolist()
    rows = {"transformers generate (sdpa, fp32)": transformers_speed(ckpt, prompt, args.new)}
    weight_bytes = {}
    for dtype in ("fp32", "fp16"):
        export(str(ckpt), work / f"export-{dtype}", dtype=dtype, validate=False, max_seq_len=2048)
        weight_bytes[dtype] = (work / f"export-{dtype}" / "model.onnx.data").stat().st_size
        for label, fusions in (("default fusions", None), ("all fusions", "all")):
            out = work / f"build-{dtype}-{fusions or 'default'}"
            kw = {"fusions": frozenset({"rms_norm", "rotary", "rotary_keys", "attention"})} if fusions else {}
            build(work / f"export-{dtype}", out, onnx_only=True, **kw)
            rows[f"trtglm run --backend ort, {dtype}, {label}"] = ort_speed(out, prompt, args.new)
            print(json.dumps({label: rows[f"trtglm run --backend ort, {dtype}, {label}"] | {"tokens": None}}), flush=True)
    bandwidth = read_bandwidth_gbs()
    per_token = weight_bytes["fp32"] - config["vocab_size"] * config["hidden_size"] * 4  # one embedding row is read
    limit = bandwidth * 1e9 / per_token
    base = rows["transformers generate (sdpa, fp32)"]
    print(f"\nread bandwidth {bandwidth:.1f} GB/s (2 threads); fp32 weights read per token (all but the embedding "
          f"table) {per_token / 1e6:.0f} MB: limit {limit:.1f} tok/s\n")
    print("| runner | time to first token (ms) | decode tok/s | vs transformers | of fp32 bandwidth limit | tokens = transformers |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} | x{r['decode_tok_s'] / base['decode_tok_s']:.2f} "
              f"| {r['decode_tok_s'] / limit:.0%} | {'yes' if r['tokens'] == base['tokens'] else 'no'} |")


if __name__ == "__main__":
    main()
