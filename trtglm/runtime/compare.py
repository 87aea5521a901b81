"""Two backends over the same build, step by step: how far apart their logits are, and whether they choose the
same greedy tokens wherever the reference's choice is not a near tie. What proves an engine on a GPU against
ONNX Runtime, when a bitwise token match cannot be expected (fp16 kernels differ in rounding)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .generate import generate


@dataclass
class Comparison:
    steps: int  # positions compared (prompts x new tokens)
    max_logit_diff: float  # the largest |a - b| over every compared position, relative to the logit scale
    decided: int  # positions whose reference top-2 margin exceeds the tolerance
    agreed: int  # of those, how many the candidate chose the same token

    def passed(self, tolerance: float) -> bool:
        return self.max_logit_diff <= tolerance and self.agreed == self.decided


def compare_backends(candidate, reference, prompts: list[list[int]], new_tokens: int = 8,
                     tolerance: float = 2e-2) -> Comparison:
    """Teacher-forced along the reference's greedy continuation of each prompt: both backends prefill the prompt,
    then decode the reference's tokens one by one, and each step's next-token logits are compared."""
    steps, worst, decided, agreed = 0, 0.0, 0, 0
    for prompt in prompts:
        continuation = generate(reference, [prompt], max_new_tokens=new_tokens).tokens[0]
        caches = [candidate.new_cache(1), reference.new_cache(1)]
        chunks = [prompt] + [[t] for t in continuation[:-1]]
        seen = 0
        for chunk in chunks:
            ids = np.array([chunk])
            mask = np.ones((1, seen + len(chunk)), np.int64)
            positions = np.arange(seen, seen + len(chunk))[None]
            rows = []
            for k, backend in enumerate((candidate, reference)):
                logits, caches[k] = backend.forward(ids, mask, positions, caches[k])
                rows.append(logits[0, -1].astype(np.float64))
            seen += len(chunk)
            a, b = rows
            scale = np.abs(b).max()
            worst = max(worst, float(np.abs(a - b).max() / scale))
            steps += 1
            top2 = np.sort(b)[-2:]
            if top2[1] - top2[0] > tolerance * scale:
                decided += 1
                agreed += int(a.argmax() == b.argmax())
    return Comparison(steps, worst, decided, agreed)
