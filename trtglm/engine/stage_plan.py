"""How many stages a build needs: consecutive layer ranges whose engine builds each fit a memory budget.

A stage's engine build runs in a process of its own, whose peak memory grows with the weights it parses and
compiles: at most BUILD_FACTOR times the stage's weight bytes above BUILD_BASE_BYTES (Python, the TensorRT
library, the builder's own state), an upper bound of what `python bench/build.py` measures of its stage builds.
The budget bounds that estimate for every stage: as few stages as fit, filled in order, the embedding in the
first and the final norm and lm_head in the last.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import UsageError
from .stage_graphs import LayerMap

BUILD_BASE_BYTES = 1 << 29  # 0.5 GiB
BUILD_FACTOR = 3.5


def build_peak(weight_bytes: int) -> int:
    """The estimated peak memory of one engine build over `weight_bytes` of weights."""
    return int(BUILD_BASE_BYTES + BUILD_FACTOR * weight_bytes)


@dataclass(frozen=True)
class StagePlan:
    ranges: list[tuple[int, int]]  # layers of each stage: first, end (exclusive)
    weight_bytes: list[int]  # each stage's weights
    budget: int

    @property
    def peak(self) -> int:
        return build_peak(max(self.weight_bytes))

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget, "estimated_peak_bytes": self.peak,
                "stages": [{"layers": list(r), "weight_bytes": w} for r, w in zip(self.ranges, self.weight_bytes)]}


def smallest_budget(layers: LayerMap) -> int:
    """The least budget any staging fits: the largest single layer, with the ends on the first and last."""
    sizes = list(layers.layer_bytes)
    if len(sizes) == 1:
        return build_peak(sizes[0] + layers.head_bytes + layers.tail_bytes)
    sizes[0] += layers.head_bytes
    sizes[-1] += layers.tail_bytes
    return build_peak(max(sizes))


def plan_stages(layers: LayerMap, budget: int) -> StagePlan:
    """The fewest consecutive layer ranges whose builds each fit in `budget` bytes."""
    need = smallest_budget(layers)
    if budget < need:
        raise UsageError(f"a memory budget of {budget / 2**30:.2f} GiB is too small to build even one layer per "
                         f"stage: the smallest that works is {need / 2**30:.2f} GiB",
                         hint=f"pass --max-memory {-(-need // 2**20)}M or more")
    limit = (budget - BUILD_BASE_BYTES) / BUILD_FACTOR
    ranges, sizes = [], []
    first, size = 0, layers.head_bytes
    for layer, layer_bytes in enumerate(layers.layer_bytes):
        tail = layers.tail_bytes if layer == layers.layers - 1 else 0
        if layer > first and size + layer_bytes + tail > limit:
            ranges.append((first, layer))
            sizes.append(size)
            first, size = layer, 0
        size += layer_bytes + tail
    ranges.append((first, layers.layers))
    sizes.append(size)
    return StagePlan(ranges, sizes, budget)
