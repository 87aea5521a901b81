"""Check an exported decoder against the transformers reference: prefill, then two decode steps.

The reference runs first and is freed before ONNX Runtime loads the graph, so the weights are
never held twice. Inputs are fixed random tokens, a batch of two with the second row left-padded.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import ValidationFailed
from ..core.memory import require
from ..model.checkpoint import Checkpoint
from ..model.reference import load_reference
from ..runtime.backends import OrtBackend

# max |ORT - reference| over all real (non-padding) positions, relative to max(1, max |reference logits|):
# the reference runs in the export dtype (an fp32 copy of an fp16 model would hold the weights twice),
# and transformers' fp16 CPU matmuls are themselves about 1e-2 off fp32 on small random models.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


@dataclass
class Steps:
    """Token ids, masks and positions for a left-padded prefill followed by decode steps."""

    input_ids: list[np.ndarray]
    attention_mask: list[np.ndarray]
    position_ids: list[np.ndarray]

    @classmethod
    def random(cls, vocab: int, batch: int = 2, prefill: int = 6, decode: int = 2, pad: int = 2, seed: int = 0):
        rng = np.random.default_rng(seed)
        mask = np.ones((batch, prefill), np.int64)
        mask[1:, :pad] = 0
        ids, masks, pos = [rng.integers(0, vocab, (batch, prefill))], [mask], [_positions(mask)]
        for _ in range(decode):
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            ids.append(rng.integers(0, vocab, (batch, 1)))
            masks.append(mask)
            pos.append(_positions(mask)[:, -1:])
        return cls(ids, masks, pos)

    def real(self, step: int) -> np.ndarray:
        """[B,S] bool: positions of this step that are real tokens, not padding."""
        return self.attention_mask[step][:, -self.input_ids[step].shape[1]:].astype(bool)


def _positions(mask: np.ndarray) -> np.ndarray:
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)


def reference_logits(ckpt: Checkpoint, dtype: str, steps: Steps) -> list[np.ndarray]:
    import torch
    from transformers import DynamicCache

    model = load_reference(ckpt, dtype)
    cache, out = DynamicCache(config=model.config), []
    with torch.inference_mode():
        for ids, mask, pos in zip(steps.input_ids, steps.attention_mask, steps.position_ids):
            r = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      position_ids=torch.from_numpy(pos), cache=cache, use_cache=True)
            out.append(r.logits.float().numpy())
    del model, cache
    gc.collect()
    return out


def run_steps(backend, steps: Steps) -> list[np.ndarray]:
    """Logits of every step, threading the backend's own cache."""
    cache, out = backend.new_cache(steps.input_ids[0].shape[0]), []
    for ids, mask, pos in zip(steps.input_ids, steps.attention_mask, steps.position_ids):
        logits, cache = backend.forward(ids, mask, pos, cache)
        out.append(logits)
    return out


# ONNX Runtime's x86 CPU path holds every weight in fp32 (fp16 weights are folded into fp32 copies): the upper
# end of the bytes per parameter `python bench/export.py` measures at the peak; the reference runs before it.
ORT_BYTES_PER_PARAM = 4.2


def check_memory(num_parameters: int) -> None:
    """Fail before anything is written if validation cannot fit in the memory available now."""

    require(ORT_BYTES_PER_PARAM * num_parameters, "validation",
            "ONNX Runtime on the CPU holds the weights in fp32: pass --no-validate to export without the check, "
            "or validate on a larger machine", ValidationFailed)


def validate(ckpt: Checkpoint, onnx_path: Path, dtype: str) -> dict:
    """Compare logits; raise ValidationFailed beyond tolerance. Returns the figures for export.json."""
    if dtype not in TOLERANCE:
        return {"status": "skipped", "reason": f"ONNX Runtime on the CPU cannot run {dtype} compute"}
    steps = Steps.random(ckpt.config.vocab_size)
    ref = reference_logits(ckpt, dtype, steps)

    # the graph as written (TensorRT's), not ONNX Runtime's MoE op in place of its experts
    got = run_steps(OrtBackend(onnx_path, device="cpu", low_memory=True, moe_op=False), steps)
    scale = max(1.0, max(float(np.abs(r).max()) for r in ref)) if dtype == "fp16" else 1.0
    tolerance = TOLERANCE[dtype] * scale
    diffs, agree, total = [], 0, 0
    for step, (r, g) in enumerate(zip(ref, got)):
        real = steps.real(step)
        diffs.append(float(np.abs(r[real] - g[real]).max()))
        agree += int((r[real].argmax(-1) == g[real].argmax(-1)).sum())
        total += int(real.sum())
    result = {"status": "passed", "max_abs_diff": max(diffs), "per_step_max_abs_diff": diffs,
              "argmax_agreement": agree / total, "tolerance": tolerance,
              "steps": "prefill 6 (batch 2, one row left-padded by 2) + 2 decode"}
    if max(diffs) > tolerance:
        raise ValidationFailed(
            f"exported graph differs from the transformers reference: max |logits diff| {max(diffs):.3g} "
            f"> tolerance {tolerance:.3g} ({dtype}; per step {', '.join(f'{d:.3g}' for d in diffs)})",
            hint="re-run with --no-validate to keep the export anyway")
    return result
