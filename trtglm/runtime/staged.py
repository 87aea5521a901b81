"""A staged build run as one model: each step goes through the stages in order, the hidden states of one stage
the input of the next (left where the backend computes), each stage with the KV cache of its own layers."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import TrtglmError


@dataclass
class StagedCache:
    parts: list  # one cache per stage, in the form its backend keeps

    @property
    def length(self) -> int:  # a static cache's filled slots (every stage's are the same)
        return self.parts[0].length


class StagedBackend:
    """Backends of the stages of one build (ONNX Runtime, or TensorRT engines), chained: the `Backend` protocol."""

    def __init__(self, stages: list):
        _check_chain(stages)
        self.stages = stages
        last = stages[-1]
        self.name = last.name
        self.max_seq_len = min(s.max_seq_len for s in stages)
        self.vocab_size = last.vocab_size
        self.static = last.static
        self.int8_gemm = getattr(stages[0], "int8_gemm", None)
        self.device = getattr(stages[0], "device", None)

    def new_cache(self, batch: int) -> StagedCache:
        return StagedCache([s.new_cache(batch) for s in self.stages])

    def forward(self, input_ids, attention_mask, position_ids, cache: StagedCache):
        x, parts = input_ids, []
        for stage, part in zip(self.stages, cache.parts):
            x, part = stage.forward(x, attention_mask, position_ids, part)
            parts.append(part)
        return x, StagedCache(parts)

    def expand_cache(self, cache: StagedCache, batch: int) -> StagedCache:
        return StagedCache([s.expand_cache(c, batch) for s, c in zip(self.stages, cache.parts)])

    def snapshot(self, cache: StagedCache) -> StagedCache:
        return StagedCache([s.snapshot(c) for s, c in zip(self.stages, cache.parts)])

    def read_cache(self, cache: StagedCache) -> list:
        return [a for s, c in zip(self.stages, cache.parts) for a in s.read_cache(c)]

    def write_cache(self, arrays: list) -> StagedCache:
        parts, at = [], 0
        for stage in self.stages:
            n = stage.cache_tensors
            parts.append(stage.write_cache(arrays[at:at + n]))
            at += n
        return StagedCache(parts)

    def admits(self, batch: int, tokens: int, past: int) -> str | None:
        return next((r for r in (s.admits(batch, tokens, past) for s in self.stages) if r), None)

    def close(self) -> None:
        for stage in reversed(self.stages):
            stage.close()


def place_stages(stage_bytes: list[int], devices: list[int]) -> list[int]:
    """The device of each stage: consecutive stages per device (hidden states cross a device boundary once per
    device), the largest device load as small as it can be. Fewer stages than devices leave devices unused."""
    if not devices:
        raise ValueError("no devices to place stages on")
    n, k = len(stage_bytes), min(len(devices), len(stage_bytes))
    prefix = [0]
    for size in stage_bytes:
        prefix.append(prefix[-1] + size)
    # best[j][i]: the smallest largest load of the first i stages on j devices, and where the last group starts
    best = [[(float("inf"), 0)] * (n + 1) for _ in range(k + 1)]
    best[0][0] = (0, 0)
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            best[j][i] = min((max(best[j - 1][s][0], prefix[i] - prefix[s]), s) for s in range(j - 1, i))
    out, i = [0] * n, n
    for j in range(k, 0, -1):
        start = best[j][i][1]
        out[start:i] = [devices[j - 1]] * (i - start)
        i = start
    return out


def _check_chain(stages: list) -> None:
    """Each stage reads what the one before writes: token ids first, logits last (a manifest whose stages were
    edited, dropped or reordered is refused here, before any step)."""
    reads = [["input_ids"]] + [s.exit for s in stages]
    for i, stage in enumerate(stages):
        if sorted(stage.entry) != sorted(reads[i]):
            raise TrtglmError(f"the build's stages do not chain: stage {i} reads {', '.join(stage.entry) or 'nothing'}"
                              f" where {'the tokens are' if i == 0 else f'stage {i - 1} writes'} "
                              f"{', '.join(reads[i])}", hint="rebuild the build directory (trtglm build --force)")
    if stages[-1].exit != ["logits"]:
        raise TrtglmError(f"the build's stages do not chain: the last writes {', '.join(stages[-1].exit)}, not logits",
                          hint="rebuild the build directory (trtglm build --force)")
