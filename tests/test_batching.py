"""Continuous batching (runtime/batching.py) and the prefix cache against each prompt generated alone."""

import numpy as np
import pytest

from trtglm.engine.build import build
from trtglm.runtime.backends import OrtBackend
from trtglm.runtime.batching import Joining, RunningBatch
from trtglm.runtime.generate import generate
from trtglm.runtime.prefix_cache import PrefixCache


def staggered(backend, prompts: list[list[int]], new: list[int], max_batch: int, prefixes: PrefixCache | None = None):
    """Greedy tokens of each prompt through one RunningBatch: a prompt joins every other step while there is room,
    a row leaves as soon as it has its tokens (so rows of other lengths come and go around each one)."""
    batch, out, waiting, step = RunningBatch(backend), {i: [] for i in range(len(prompts))}, list(range(len(prompts))), 0

    def first(join, logits, arrays):
        if prefixes is not None:
            prefixes.store(join.ids, arrays)
        out[join.key].append(int(logits.argmax()))
        return None if new[join.key] == 1 else out[join.key][-1]

    while waiting or len(batch):
        leaving = {r.key for r in batch.rows if len(out[r.key]) >= new[r.key]}
        joining = []
        if waiting and step % 2 == 0 and len(batch) - len(leaving) < max_batch:
            k = waiting.pop(0)
            joining.append(Joining(k, prompts[k], prefixes.lookup(prompts[k]) if prefixes is not None else None))
        batch.update(leaving, joining, first)
        step += 1
        if len(batch):
            for row, logits in zip(batch.rows, batch.step()):
                row.token = int(logits.argmax())
                out[row.key].append(row.token)
    return [out[i] for i in range(len(prompts))]


RNG = np.random.default_rng(7)
PROMPTS = [[int(t) for t in RNG.integers(3, 150, n)] for n in (5, 14, 9, 2, 16, 7, 12)]
NEW = [12, 4, 9, 20, 1, 6, 15]


@pytest.fixture(scope="module")
def builds(exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    for kv_cache in ("dynamic", "static"):
        build(exports["glm4"], root / kv_cache, onnx_only=True, overrides={"shapes": {"kv_cache": kv_cache}})
    return {k: root / k for k in ("dynamic", "static")}


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_rows_that_come_and_go_generate_what_each_prompt_does_alone(builds, kv_cache):
    backend = OrtBackend.from_build(builds[kv_cache])
    alone = [generate(backend, [p], max_new_tokens=n).tokens[0] for p, n in zip(PROMPTS, NEW)]
    assert staggered(backend, PROMPTS, NEW, max_batch=3) == alone


def test_a_shared_prefix_is_computed_once_and_changes_nothing(builds):
    backend = OrtBackend.from_build(builds["dynamic"])
    system = [int(t) for t in RNG.integers(3, 150, 20)]
    prompts = [system + p for p in PROMPTS[:4]]
    prefixes = PrefixCache(1 << 30)
    alone = [generate(backend, [p], max_new_tokens=n).tokens[0] for p, n in zip(prompts, NEW)]
    assert staggered(backend, prompts, NEW[:4], max_batch=2, prefixes=prefixes) == alone
    assert prefixes.hits == 3 and prefixes.reused_tokens >= 3 * len(system)


def test_the_prefix_cache_is_bounded_in_bytes_least_recently_used_first():
    def cache(n):  # a prompt's cache: 2 tensors [1, 1, n, 4] of float32, 32 bytes a token
        return [np.full((1, 1, n, 4), n, np.float32) for _ in range(2)]

    prefixes = PrefixCache(max_bytes=32 * 50, min_tokens=4)
    a, b, c = list(range(20)), list(range(100, 120)), list(range(200, 220))
    prefixes.store(a, cache(20))
    prefixes.store(b, cache(20))
    assert prefixes.lookup(a + [7]) is not None  # a is now the most recently used
    prefixes.store(c, cache(20))  # 60 tokens > 50: b, the least recently used, goes
    assert prefixes.bytes == 32 * 40 and len(prefixes) == 2
    assert prefixes.lookup(b + [1]) is None
    hit = prefixes.lookup(a[:10] + [999])
    assert hit[0].shape == (1, 1, 10, 4)  # the cache of the common part only
    assert prefixes.lookup(a)[0].shape[2] == 19  # one token is always left to compute
    assert prefixes.lookup(a[:3] + [5]) is None  # under min_tokens
    prefixes.store(a + [1, 2], cache(22))  # extends a: a's entry is dropped
    assert len(prefixes) == 2 and prefixes.bytes == 32 * 42
    prefixes.store(list(range(300, 400)), cache(100))  # larger than the whole cache: not kept
    assert len(prefixes) == 2
