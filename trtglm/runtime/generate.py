"""One generation loop for every backend: prefill, decode, sampling, stop tokens, prefix reuse.

    prompts ─ left pad ─ [prefix cache] ─ prefill ─ choose ─┬─ decode step ─ choose ─┐
                                                            └──── until stop / max ──┘
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..core.errors import TrtglmError
from .sampling import Sampling, choose


@dataclass
class Prefix:
    """A shared prefix (a system prompt) whose KV cache is computed once, at batch 1."""

    ids: list[int]
    cache: object


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, stop token included
    finish: list[str]  # "stop" or "length" per prompt
    prefill_seconds: float
    step_seconds: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        return len(self.step_seconds) / sum(self.step_seconds) if self.step_seconds else 0.0


def make_prefix(backend, ids: list[int]) -> Prefix:
    cache = backend.new_cache(1)
    n = len(ids)
    _, cache = backend.forward(np.array([ids]), np.ones((1, n), np.int64), np.arange(n)[None], cache)
    return Prefix(list(ids), backend.snapshot(cache))  # a backend reusing its buffers hands out a copy


def admit(backend, batch: int, longest: int, past: int = 0, max_new_tokens: int = 1) -> int:
    """How many new tokens a request of `batch` prompts (the longest `longest` tokens, after `past` cached ones)
    may generate on `backend`; refuses, before any memory is allocated, a request the build cannot run."""
    room = backend.max_seq_len - past - longest
    if room < 1:
        raise TrtglmError(f"prompt of {past + longest} tokens leaves no room in the engine's max_seq_len "
                          f"{backend.max_seq_len}")
    max_new = min(max_new_tokens, room)
    for tokens, cached in ((longest, past), (1, past + longest)):  # the prefill, then every decode step
        reason = backend.admits(batch, tokens, cached)
        if reason:
            raise TrtglmError(f"this request cannot run on this build: {reason}")
    return max_new


def generate(backend, prompts: list[list[int]], *, max_new_tokens: int = 64, sampling: Sampling = Sampling(),
             stop_ids: set[int] | frozenset[int] = frozenset(), pad_id: int = 0, prefix: Prefix | None = None,
             on_token: Callable[[int, int], None] | None = None) -> Generation:
    """Generate for a batch of token-id prompts (left-padded together). `on_token(row, token)` streams."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TrtglmError("every prompt needs at least one token")
    batch, longest = len(prompts), max(len(p) for p in prompts)
    past = len(prefix.ids) if prefix else 0
    max_new = admit(backend, batch, longest, past, max_new_tokens)
    ids = np.full((batch, longest), pad_id, np.int64)
    mask = np.zeros((batch, past + longest), np.int64)
    mask[:, :past] = 1
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = p
        mask[row, past + longest - len(p):] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    cache = backend.expand_cache(prefix.cache, batch) if prefix else backend.new_cache(batch)
    history = [np.array((prefix.ids if prefix else []) + list(p), np.int64) for p in prompts]
    rng = np.random.default_rng(sampling.seed)

    started = time.perf_counter()
    logits, cache = backend.forward(ids, mask, positions[:, past:], cache)
    token = choose(logits[:, -1], history, sampling, rng)
    result = Generation([[] for _ in prompts], ["length"] * batch, time.perf_counter() - started)
    done = np.zeros(batch, bool)
    next_pos = positions[:, -1] + 1
    for step in range(max_new):
        for row in range(batch):
            if not done[row]:
                t = int(token[row])
                result.tokens[row].append(t)
                history[row] = np.append(history[row], t)
                if on_token:
                    on_token(row, t)
                if t in stop_ids:
                    done[row], result.finish[row] = True, "stop"
        if done.all() or step == max_new - 1:
            break
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        t0 = time.perf_counter()
        logits, cache = backend.forward(np.where(done, pad_id, token)[:, None], mask, next_pos[:, None], cache)
        token = choose(logits[:, -1], history, sampling, rng)
        result.step_seconds.append(time.perf_counter() - t0)
        next_pos = next_pos + 1
    return result
