"""Prompts' KV caches kept on the host for later prompts that start the same way (a shared system prompt is
computed once), bounded in bytes, the least recently used dropped first.

A cache of a prompt holds the cache of each of its prefixes (causal attention: position i depends on positions
<= i only), so one entry serves any later prompt sharing its first tokens: `lookup` cuts the longest match.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class PrefixCache:
    def __init__(self, max_bytes: int, min_tokens: int = 16):
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens  # shorter matches are computed again: a copy costs about what they save
        self.bytes = 0
        self.hits = 0
        self.reused_tokens = 0
        self._entries: OrderedDict[tuple[int, ...], list[np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: list[int]) -> list[np.ndarray] | None:
        """The cache of the longest cached prefix of `ids` (one token at least left to compute), or None."""
        best, best_n = None, 0
        query = np.asarray(ids)
        for key in self._entries:
            m = min(len(key), len(ids) - 1)
            if m <= best_n:
                continue
            diff = np.flatnonzero(np.asarray(key[:m]) != query[:m])
            n = int(diff[0]) if diff.size else m
            if n > best_n:
                best, best_n = key, n
        if best is None or best_n < self.min_tokens:
            return None
        self._entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += best_n
        return [a[:, :, :best_n] for a in self._entries[best]]

    def store(self, ids: list[int], arrays: list[np.ndarray]) -> None:
        """Keep the cache of `ids` (arrays [1, heads, len(ids), D]); entries it extends are dropped."""
        key = tuple(ids)
        size = sum(a.nbytes for a in arrays)
        if len(key) < self.min_tokens or size > self.max_bytes:
            return
        for other in [k for k in self._entries if len(k) <= len(key) and key[:len(k)] == k]:
            self._drop(other)
        self._entries[key] = arrays
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        self.bytes -= sum(a.nbytes for a in self._entries.pop(key))
