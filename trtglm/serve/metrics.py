"""The server's Prometheus metrics, in a registry of its own (one per server)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# seconds: from a few milliseconds (a small model's step) to a minute (a long prompt behind a full queue)
_LATENCY = (.005, .01, .025, .05, .075, .1, .15, .25, .5, .75, 1, 1.5, 2.5, 5, 10, 30, 60)


class Metrics:
    WINDOW = 10.0  # seconds over which tokens/s is measured

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("trtglm_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=_LATENCY, registry=r)
        self.per_token = Histogram("trtglm_time_per_output_token_seconds",
                                   "Between two tokens of one request", buckets=_LATENCY, registry=r)
        self.queue = Gauge("trtglm_queue_depth", "Requests waiting to join the running batch", registry=r)
        self.running = Gauge("trtglm_running_batch_size", "Rows in the running batch", registry=r)
        self.generated = Counter("trtglm_generated_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("trtglm_prompt_tokens", "Prompt tokens received", registry=r)
        self.prefix_tokens = Counter("trtglm_prefix_cache_reused_tokens",
                                     "Prompt tokens whose cache came from the prefix cache", registry=r)
        self.requests = Counter("trtglm_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.cancelled = Counter("trtglm_cancelled_requests", "Requests whose client went away before the end",
                                 registry=r)
        rate = Gauge("trtglm_output_tokens_per_second", f"Tokens generated per second over the last {self.WINDOW:g} s",
                     registry=r)
        rate.set_function(self._rate)
        self._recent: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def tokens(self, now: float, submitted: float | None, previous: float | None) -> None:
        """A token generated at `now`: the first of its request (submitted then), or one after `previous`."""
        self.generated.inc()
        if submitted is not None:
            self.ttft.observe(now - submitted)
        elif previous is not None:
            self.per_token.observe(now - previous)
        with self._lock:
            self._recent.append(now)
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0] < now - self.WINDOW:
            self._recent.popleft()

    def _rate(self) -> float:
        with self._lock:
            self._trim(time.perf_counter())
            return len(self._recent) / self.WINDOW
