"""Continuous batching: rows join a running batch at any step and leave it as soon as they are done.

    cache columns    0 .......................... W-1
    row 0            pad pad [ its tokens .......... ]
    row 1            [ its tokens ................... ]     W: the longest row's cached tokens
    row 2            pad pad pad pad pad [ its tokens ]

Every row's tokens end at the last column (left padding, the layout `generate` gives a batch), so one decode
step appends one column for every row; each row keeps its own positions, and the mask hides the padding. A row
joins from a batch-1 prefill of its prompt (after a cached prefix, if one is given); a row that leaves is
dropped, and the columns no row reaches any more are cut, so W never exceeds the longest row. Rows join and
leave through a copy of the cache on the host (`Backend.read_cache` / `write_cache`), once per step in which
any do; a step where none does copies nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Row:
    key: object  # the caller's handle
    length: int  # tokens in the cache
    token: int  # the token chosen last, not in the cache yet


@dataclass
class Joining:
    key: object
    ids: list[int]  # the prompt
    cached: list[np.ndarray] | None = None  # the cache of ids[:n] from an earlier prefill (a shared prefix)


# Called for each joining row with its prefill's last logits [V] and its cache on the host ([1, heads, len(ids), D]
# per tensor); returns the row's first token, or None when the row is done already (it then never joins).
FirstToken = Callable[[Joining, np.ndarray, list[np.ndarray]], "int | None"]


class RunningBatch:
    def __init__(self, backend):
        self.backend = backend
        self.clear()

    def clear(self) -> None:
        """No rows (their cache dropped)."""
        self.rows: list[Row] = []
        self.cache = None
        self.width = 0

    def __len__(self) -> int:
        return len(self.rows)

    def update(self, leaving: set, joining: list[Joining], first: FirstToken) -> None:
        """Drop the rows whose keys are in `leaving`, prefill the `joining` ones and add them."""
        keep = [i for i, r in enumerate(self.rows) if r.key not in leaving]
        if len(keep) == len(self.rows) and not joining:
            return
        # read before any prefill: a backend may hold one cache at a time (the TensorRT engine's buffers)
        old = self.backend.read_cache(self.cache) if keep else None
        rows = [self.rows[i] for i in keep]
        joined: list[list[np.ndarray]] = []
        for join in joining:
            logits, arrays = self.prefill(join)
            token = first(join, logits, arrays)
            if token is not None:
                rows.append(Row(join.key, len(join.ids), int(token)))
                joined.append(arrays)
        if not rows:
            self.clear()
            return
        width = max(r.length for r in rows)
        merged = []
        for t, template in enumerate(old if old is not None else joined[0]):
            out = np.zeros((len(rows), template.shape[1], width, template.shape[3]), template.dtype)
            if old is not None:  # the kept rows end at the last column, before and after: one copy for all
                span = min(width, self.width)
                out[:len(keep), :, width - span:] = old[t][keep, :, self.width - span:]
            for j, arrays in enumerate(joined, len(keep)):
                out[j, :, width - arrays[t].shape[2]:] = arrays[t][0]
            merged.append(out)
        self.rows, self.width = rows, width
        self.cache = self.backend.write_cache(merged)

    def prefill(self, join: Joining) -> tuple[np.ndarray, list[np.ndarray]]:
        """The prompt alone (batch 1, after its cached prefix): its last logits and its cache on the host."""
        backend, done = self.backend, join.cached[0].shape[2] if join.cached else 0
        cache = backend.write_cache(join.cached) if join.cached else backend.new_cache(1)
        new = np.array([join.ids[done:]], np.int64)
        total = len(join.ids)
        logits, cache = backend.forward(new, np.ones((1, total), np.int64), np.arange(done, total)[None], cache)
        return logits[0, -1], backend.read_cache(cache)

    def step(self) -> np.ndarray:
        """One decode step for every row (each row's last token into the cache): the next logits [B, V]."""
        lengths = np.array([r.length for r in self.rows], np.int64)
        columns = np.arange(self.width + 1)[None]
        mask = (columns >= (self.width - lengths)[:, None]).astype(np.int64)
        tokens = np.array([[r.token] for r in self.rows], np.int64)
        logits, self.cache = self.backend.forward(tokens, mask, lengths[:, None], self.cache)
        for row in self.rows:
            row.length += 1
        self.width += 1
        return logits[:, -1]
