"""`trtglm serve` under load: the random-weight 136M GLM-4 shape (hidden 768, 12 layers, 12/2 heads of 64,
vocab 32000) and the shipped model, fp32 builds on ONNX Runtime, 64 streamed completion requests with prompt and
output lengths drawn from a fixed seed, sent by 1, 4, 8 and 16 concurrent clients (streaming HTTP clients in
this process, asyncio over httpx2, the openai client's HTTP library, parsing no more than a load generator must;
the server in its own process). Per concurrency: output tokens/s over the whole run, time to first token
p50/p99, and the time between two tokens of one request p50/p99; and what batching gives at most: the
generation loop's decode tokens/s at 8 rows over 1, without HTTP.

    python bench/serve.py [--workdir .bench] [--requests 64] [--concurrency 1,4,8,16]

Goal (2-core CPU, ONNX Runtime): at concurrency 8, at least 3x the output tokens/s of concurrency 1, with p99
time to first token under 1 s. Greedy, `ignore_eos`: every request generates its drawn length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from trtglm.engine.build import build
from trtglm.export.exporter import export
from trtglm.model.synthetic import glm4_config, write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "tiny-glm4"
PROMPT_TOKENS = (16, 128)  # drawn uniformly, inclusive
OUTPUT_TOKENS = (16, 128)


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=".bench")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--models", default="136M,shipped")
    return ap.parse_args()


def builds(work: Path, names: list[str]) -> dict[str, tuple[Path, int]]:
    """name -> (an fp32 build with the shipped tokenizer, its vocabulary)."""
    out = {}
    for name in names:
        ckpt = SHIPPED
        vocab = json.loads((SHIPPED / "config.json").read_text())["vocab_size"]
        if name == "136M":
            vocab = 32000
            config = glm4_config(hidden=768, layers=12, heads=12, kv_heads=2, intermediate=2560, vocab=vocab,
                                 head_dim=64, max_positions=2048)
            ckpt = work / "ckpt-136M"
            shutil.rmtree(ckpt, ignore_errors=True)
            write_random_checkpoint(ckpt, {**config, "torch_dtype": "float32"}, dtype="fp32")
            for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                shutil.copy2(SHIPPED / f, ckpt / f)
        export(str(ckpt), work / f"export-{name}", dtype="fp32", validate=False, max_seq_len=1024, force=True)
        build(work / f"export-{name}", work / f"build-{name}", onnx_only=True, force=True)
        out[name] = (work / f"build-{name}", vocab)
    return out


def workload(n: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(2026)
    return [(rng.integers(3, vocab, rng.integers(PROMPT_TOKENS[0], PROMPT_TOKENS[1] + 1)).tolist(),
             int(rng.integers(OUTPUT_TOKENS[0], OUTPUT_TOKENS[1] + 1))) for _ in range(n)]


def start(build_dir: Path, max_batch: int):
    log = build_dir.parent / f"{build_dir.name}.serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "trtglm", "serve", str(build_dir), "--port", "0", "--json",
                                 "--model-name", "m", "--max-batch", str(max_batch), "--max-queue", "256"],
                                stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"trtglm serve {build_dir} did not start: {log.read_text()[-500:]}")
    return proc, json.loads(line)


async def one(client, prompt: list[int], tokens: int) -> dict:
    """One streamed request; the time each token's chunk arrived."""
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    sent = time.perf_counter()
    times = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"the server answered {response.status_code}: {(await response.aread())[:300]}")
        async for line in response.aiter_lines():  # one chunk per token, then one with the finish reason
            if line.startswith("data: {") and '"finish_reason": null' in line:
                times.append(time.perf_counter())
    if len(times) != tokens:
        raise SystemExit(f"asked for {tokens} tokens, got {len(times)}")
    return {"sent": sent, "times": times}


async def load(url: str, requests: list[tuple[list[int], int]], concurrency: int) -> dict:
    import httpx2  # the openai client's HTTP library: a load generator light enough to leave the cores to the server

    client = httpx2.AsyncClient(base_url=url, timeout=600, limits=httpx2.Limits(max_connections=64))
    queue = list(reversed(requests))
    results = []

    async def worker():
        while queue:
            prompt, tokens = queue.pop()
            results.append(await one(client, prompt, tokens))

    await asyncio.gather(*(one(client, *r) for r in requests[:2]))  # warm-up, not timed
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ttft = [r["times"][0] - r["sent"] for r in results]
    gaps = np.concatenate([np.diff(r["times"]) for r in results])
    tokens = sum(len(r["times"]) for r in results)
    await client.aclose()
    return {"concurrency": concurrency, "requests": len(results), "output_tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_ms": 1000 * np.percentile(ttft, 50),
            "ttft_p99_ms": 1000 * np.percentile(ttft, 99), "token_p50_ms": 1000 * np.percentile(gaps, 50),
            "token_p99_ms": 1000 * np.percentile(gaps, 99)}


def step_ceiling(build_dir: Path, batch: int, width: int = 96, steps: int = 40) -> float:
    """Decode tokens/s of the generation loop alone (no HTTP) at `batch` rows of `width` cached tokens: what
    batching can give at most."""
    from trtglm.runtime.backends import OrtBackend
    from trtglm.runtime.batching import Joining, RunningBatch

    rows = RunningBatch(OrtBackend.from_build(build_dir, spin=False))
    rows.update(set(), [Joining(i, list(range(3, 3 + width))) for i in range(batch)], lambda join, logits, cache: 3)
    for _ in range(4):
        rows.step()
    started = time.perf_counter()
    for _ in range(steps):
        rows.step()
    return batch * steps / (time.perf_counter() - started)


def cpu_line() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    args = arguments()
    work = Path(args.workdir) / "serve"
    work.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"{cpu_line()}; prompts {PROMPT_TOKENS[0]}-{PROMPT_TOKENS[1]} tokens, outputs {OUTPUT_TOKENS[0]}-"
          f"{OUTPUT_TOKENS[1]} tokens, {args.requests} requests per concurrency, server --max-batch {max(levels)}")
    verdicts = []
    for name, (build_dir, vocab) in builds(work, args.models.split(",")).items():
        requests = workload(args.requests, vocab)
        proc, ready = start(build_dir, max(levels))
        try:
            rows = [asyncio.run(load(ready["url"], requests, c)) for c in levels]
        finally:
            proc.terminate()
            proc.wait()
        print(f"\n{name}: {ready['backend']}\n")
        print("| concurrency | output tokens/s | vs concurrency 1 | time to first token p50 / p99 (ms) "
              "| per token p50 / p99 (ms) | wall (s) |")
        print("|---|---|---|---|---|---|")
        base = rows[0]["tokens_per_s"]
        for r in rows:
            print(f"| {r['concurrency']} | {r['tokens_per_s']:.1f} | x{r['tokens_per_s'] / base:.2f} "
                  f"| {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['token_p50_ms']:.1f} / "
                  f"{r['token_p99_ms']:.1f} | {r['seconds']:.1f} |")
        ceiling = step_ceiling(build_dir, 8) / step_ceiling(build_dir, 1)
        print(f"\nThe generation loop alone (no HTTP), 96 cached tokens a row: 8 rows decode x{ceiling:.2f} the "
              "tokens/s of one.")
        at8 = next((r for r in rows if r["concurrency"] == 8), None)
        if at8 and levels[0] == 1:
            ratio = at8["tokens_per_s"] / base
            met = ratio >= 3 and at8["ttft_p99_ms"] < 1000
            verdicts.append(f"{name}: concurrency 8 gives x{ratio:.2f} the output tokens/s of concurrency 1 with "
                            f"p99 time to first token {at8['ttft_p99_ms']:.0f} ms: goal "
                            f"{'met' if met else 'NOT met'}")
    print()
    for v in verdicts:
        print(v)


if __name__ == "__main__":
    main()
