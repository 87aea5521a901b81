"""`trtglm bench`: time to first token, decode speed and per-token latency of a build, on any backend."""

from __future__ import annotations

import resource

import numpy as np

from .generate import admit, generate


def run_bench(backend, *, batch: int = 1, input_len: int = 128, output_len: int = 64, seed: int = 0) -> dict:
    admit(backend, batch, input_len)  # before the prompts take any memory
    rng = np.random.default_rng(seed)
    vocab = backend.vocab_size or 1000
    prompts = [rng.integers(3, vocab, input_len).tolist() for _ in range(batch)]
    generate(backend, prompts, max_new_tokens=4)  # warm-up: kernels, allocations
    result = generate(backend, prompts, max_new_tokens=output_len)
    steps = np.array(result.step_seconds)
    return {
        "backend": backend.name, "int8_gemm": backend.int8_gemm,
        "batch": batch, "input_len": input_len, "output_len": output_len,
        "ttft_ms": 1000 * result.prefill_seconds,
        "decode_tokens_per_s": result.decode_tokens_per_second,
        "decode_tokens_per_s_all_rows": result.decode_tokens_per_second * batch,
        "p50_ms": float(1000 * np.percentile(steps, 50)) if steps.size else None,
        "p99_ms": float(1000 * np.percentile(steps, 99)) if steps.size else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device_memory_mb": _device_memory_mb(backend),
    }


def _device_memory_mb(backend) -> float | None:
    if backend.name != "trt":
        return None
    import pycuda.driver as cuda

    free, total = cuda.mem_get_info()
    return (total - free) / 2**20
