"""The generation loop of a server: requests queue, join the running batch at the next step and leave it as
soon as they finish or are cancelled (continuous batching, runtime/batching.py), on a thread of its own.

    submit ─> waiting (at most max_queue) ─> joins: prefill alone, first token ─┐
                                                      running batch: decode step ┴─> tokens to each request

Each request samples with its own settings and random generator, so what it gets does not depend on who else
is served. A prompt that starts like an earlier one reuses that one's cache (runtime/prefix_cache.py).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..core.errors import TrtglmError
from ..runtime.batching import Joining, RunningBatch
from ..runtime.generate import admit
from ..runtime.prefix_cache import PrefixCache
from ..runtime.sampling import Sampling, choose

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 8  # rows decoded together
    max_queue: int = 64  # requests waiting to join; more are refused
    prefix_cache_bytes: int = 256 << 20
    prefill_tokens: int = 512  # prompt tokens prefilled between two decode steps (the first joiner always is)


class QueueFull(TrtglmError):
    def __init__(self, retry_after: float):
        super().__init__("the server's queue is full: try again later")
        self.retry_after = retry_after


# What a request hears: a token (None with the finish), and the finish ("stop", "length", or "error: ..." when
# the step failed). The Scheduler hands each step's events to `deliver` at once (default: each listener called on
# the loop thread; a server passes them to its event loop in one call).
Listener = Callable[[int | None, str | None], None]
Event = tuple["Request", "int | None", "str | None"]


@dataclass(eq=False)
class Request:
    ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop_ids: frozenset[int]
    listener: Listener
    cancelled: bool = False
    generated: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None
    history: np.ndarray = field(init=False)
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        self.history = np.array(self.ids, np.int64)
        self.rng = np.random.default_rng(self.sampling.seed)


class Scheduler:
    def __init__(self, backend, options: ServeOptions = ServeOptions(), metrics=None):
        self.backend = backend
        self.options = options
        self.metrics = metrics
        self.batch = RunningBatch(backend)
        self.prefixes = PrefixCache(options.prefix_cache_bytes)
        self._waiting: collections.deque[Request] = collections.deque()
        self._finished: set[Request] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._step_seconds = 0.05  # running estimate of one decode step, for Retry-After
        self._outbox: list[Event] = []
        self.deliver: Callable[[list[Event]], None] = call_listeners
        self.failure: str | None = None  # why the loop stopped, if it did on its own

    # ---------------------------------------------------------------- the server's side

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trtglm-generation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def allowed_tokens(self, ids: list[int], limit: int | None) -> int:
        """How many tokens a prompt may generate (at most `limit`; None: as many as the build's context leaves);
        a prompt the build cannot run is refused (`trtglm run`'s check)."""
        return admit(self.backend, 1, len(ids), max_new_tokens=limit or self.backend.max_seq_len)

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (all or none: a full queue raises QueueFull)."""
        with self._cond:
            if len(self._waiting) + len(requests) > self.options.max_queue:
                raise QueueFull(self._retry_after())
            self._waiting.extend(requests)
            self._gauges()
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Its row leaves the batch at the next step (or it never joins)."""
        with self._cond:
            request.cancelled = True
            self._cond.notify()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def _retry_after(self) -> float:
        """About when a queued request will have joined: the queue's rows over the batch, a few steps each."""
        rounds = 1 + len(self._waiting) // max(1, self.options.max_batch)
        return max(1.0, rounds * 32 * self._step_seconds)

    # ---------------------------------------------------------------- the loop thread

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not len(self.batch):
                        self._cond.wait()
                    if self._stopping:
                        return
                    joining = self._take()
                leaving = self._finished | {r.key for r in self.batch.rows if r.key.cancelled}
                self._finished = set()
                try:
                    self._iterate(leaving, joining)
                except Exception as e:  # noqa: BLE001 - the step failed: its rows end with the reason, the loop goes on
                    if not isinstance(e, TrtglmError):
                        LOG.exception("a generation step failed")
                    self._fail([r.key for r in self.batch.rows] + joining, _one_line(e))
                self._flush()
        except Exception as e:  # a bug in the loop itself: every request hears it, and /health reports it
            LOG.exception("the generation loop stopped")
            self.failure = _one_line(e)
            self._fail([r.key for r in self.batch.rows] + list(self._waiting), self.failure)
            self._flush()

    def _take(self) -> list[Request]:
        joining, tokens = [], 0
        while self._waiting and len(self.batch) + len(joining) < self.options.max_batch:
            request = self._waiting[0]
            if request.cancelled:
                self._waiting.popleft()
                continue
            if joining and tokens + len(request.ids) > self.options.prefill_tokens:
                break
            joining.append(self._waiting.popleft())
            tokens += len(request.ids)
        self._gauges()
        return joining

    def _iterate(self, leaving: set, joining: list[Request]) -> None:
        joins = [Joining(r, r.ids, self._reusable(r.ids)) for r in joining]
        self.batch.update(leaving, joins, self._first)
        if self.metrics:
            self.metrics.running.set(len(self.batch))
        if not len(self.batch):
            return
        t = time.perf_counter()
        logits = self.batch.step()
        self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.perf_counter() - t)
        for row, row_logits in zip(self.batch.rows, logits):
            row.token = self._choose(row.key, row_logits)
            if self._emit(row.key, row.token):
                self._finished.add(row.key)

    def _reusable(self, ids: list[int]):
        cached = self.prefixes.lookup(ids)
        if cached is None:
            return None
        if self.backend.admits(1, len(ids) - cached[0].shape[2], cached[0].shape[2]):  # split engine profiles
            return None
        if self.metrics:
            self.metrics.prefix_tokens.inc(cached[0].shape[2])
        return cached

    def _first(self, join: Joining, logits: np.ndarray, arrays: list[np.ndarray]) -> int | None:
        self.prefixes.store(join.ids, arrays)
        request = join.key
        if request.cancelled:
            return None
        token = self._choose(request, logits)
        return None if self._emit(request, token) else token

    def _choose(self, request: Request, logits: np.ndarray) -> int:
        token = int(choose(logits[None], [request.history], request.sampling, request.rng)[0])
        if request.sampling.repetition_penalty != 1.0:  # the only reader of the history
            request.history = np.append(request.history, token)
        return token

    def _emit(self, request: Request, token: int) -> bool:
        """Hand `token` to its request; True when the request is done."""
        request.generated += 1
        now = time.perf_counter()
        if self.metrics:
            self.metrics.tokens(now, request.submitted if request.last_token_at is None else None,
                                request.last_token_at)
        request.last_token_at = now
        finish = "stop" if token in request.stop_ids else "length" if request.generated >= request.max_tokens \
            else None
        self._outbox.append((request, token, finish))
        return finish is not None or request.cancelled

    def _fail(self, requests: list[Request], reason: str) -> None:
        self.batch.clear()
        for request in requests:
            self._outbox.append((request, None, f"error: {reason}"))

    def _flush(self) -> None:
        events, self._outbox = self._outbox, []
        if events:
            try:
                self.deliver(events)
            except RuntimeError:  # the server's event loop is gone (shutting down): nobody listens
                for request, _, _ in events:
                    request.cancelled = True

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.queue.set(len(self._waiting))


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if isinstance(e, TrtglmError) else f"{type(e).__name__}: {text[0] if text else ''}")[:300]


def call_listeners(events: list[Event]) -> None:
    for request, token, finish in events:
        request.listener(token, finish)
