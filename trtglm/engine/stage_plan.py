"""How many stages a build needs: consecutive layer ranges whose work each fits a memory budget.

A stage's engine build runs in a process of its own, whose peak memory grows with the weights it parses and
compiles: at most BUILD_FACTOR times the stage's weight bytes above BUILD_BASE_BYTES (Python, the TensorRT
library, the builder's own state), an upper bound of what `python bench/build.py` measures of its stage builds.
A build that changes the precision first converts each stage from the export's weights, which has its own peak
(`precision.conversion_peak`). The budget bounds both for every stage: as few stages as fit, filled in order,
the embedding in the first and the final norm and lm_head in the last.
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
class StageCost:
    """The peak memory of one stage's work, from its weight bytes as exported: the engine build over them in the
    build's dtype (`scale` bytes per exported byte), and a precision conversion before it (None: none)."""

    scale: float = 1.0
    conversion: object = None  # exported weight bytes -> the conversion's peak

    def built_bytes(self, exported: int) -> int:
        return int(exported * self.scale)

    def peak(self, exported: int) -> int:
        build = build_peak(self.built_bytes(exported))
        return build if self.conversion is None else max(build, int(self.conversion(exported)))


@dataclass(frozen=True)
class StagePlan:
    ranges: list[tuple[int, int]]  # layers of each stage: first, end (exclusive)
    weight_bytes: list[int]  # each stage's weights in the build's dtype
    budget: int
    peak: int  # the estimated peak of the largest stage's work

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget, "estimated_peak_bytes": self.peak,
                "stages": [{"layers": list(r), "weight_bytes": w} for r, w in zip(self.ranges, self.weight_bytes)]}


def _stage_sizes(layers: LayerMap) -> list[int]:
    """Each layer's weights, the embedding counted with the first and the final norm and lm_head with the last."""
    sizes = list(layers.layer_bytes)
    sizes[0] += layers.head_bytes
    sizes[-1] += layers.tail_bytes
    return sizes


def smallest_budget(layers: LayerMap, cost: StageCost = StageCost()) -> int:
    """The least budget any staging fits: the largest single layer, with the ends on the first and last."""
    return cost.peak(max(_stage_sizes(layers)))


def plan_stages(layers: LayerMap, budget: int, cost: StageCost = StageCost()) -> StagePlan:
    """The fewest consecutive layer ranges whose work each fits in `budget` bytes (`layers` in exported bytes)."""
    need = smallest_budget(layers, cost)
    if budget < need:
        raise UsageError(f"a memory budget of {budget / 2**30:.2f} GiB is too small to build even one layer per "
                         f"stage: the smallest that works is {need / 2**30:.2f} GiB",
                         hint=f"pass --max-memory {-(-need // 2**20)}M or more")
    ranges, sizes = [], []
    first, size = 0, 0
    for layer, layer_bytes in enumerate(_stage_sizes(layers)):
        if layer > first and cost.peak(size + layer_bytes) > budget:
            ranges.append((first, layer))
            sizes.append(size)
            first, size = layer, 0
        size += layer_bytes
    ranges.append((first, layers.layers))
    sizes.append(size)
    return StagePlan(ranges, [cost.built_bytes(s) for s in sizes], budget, max(cost.peak(s) for s in sizes))
