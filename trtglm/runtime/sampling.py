"""Next-token choice: greedy, or temperature / top-k / top-p sampling, with a repetition penalty."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        finite = all(math.isfinite(v) for v in (self.temperature, self.top_p, self.repetition_penalty))
        if not finite or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or \
                self.repetition_penalty <= 0 or (self.seed is not None and self.seed < 0):
            raise ValueError("sampling needs finite values with temperature >= 0, 0 < top_p <= 1, top_k >= 0, "
                             "repetition_penalty > 0 and a seed >= 0")


def choose(logits: np.ndarray, history: list[np.ndarray], s: Sampling, rng: np.random.Generator) -> np.ndarray:
    """logits [B,V] (fp32), history: each row's tokens so far -> next token per row [B]."""
    if s.temperature == 0.0 and s.repetition_penalty == 1.0:
        return logits.argmax(axis=-1)
    logits = logits.astype(np.float64, copy=True)
    if s.repetition_penalty != 1.0:  # as transformers: shrink the logits of tokens already seen
        for row, seen in zip(logits, history):
            idx = np.unique(seen)
            vals = row[idx]
            with np.errstate(over="ignore"):  # a tiny penalty sends a logit to inf: clipped below
                row[idx] = np.where(vals < 0, vals * s.repetition_penalty, vals / s.repetition_penalty)
    if s.temperature == 0.0:
        return logits.argmax(axis=-1)
    # shifted by each row's largest logit first: a tiny temperature sends the others to -inf, never to NaN
    logits = np.clip(logits, -1e300, 1e300)
    with np.errstate(over="ignore"):
        logits = (logits - logits.max(axis=-1, keepdims=True)) / s.temperature
    if s.top_k:
        k = min(s.top_k, logits.shape[-1])
        kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = _softmax(logits)
    if s.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        drop = np.cumsum(sorted_p, axis=-1) - sorted_p > s.top_p  # keep the smallest set reaching top_p
        sorted_p[drop] = 0.0
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, sorted_p, axis=-1)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[0], p=p) for p in probs])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
