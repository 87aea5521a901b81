"""`trtglm eval`: a build against its fp32 reference on held-out text (the accuracy gate).

    eval.jsonl ─ tokenizer ─ windows of seq_len ─┬─ candidate (BUILD_DIR) ─┐
                                                 └─ reference (EXPORT_DIR) ┴─ perplexity, delta, agreement, cosine
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import numpy as np

from ..core.errors import TrtglmError, UsageError
from ..core.recipe import AccuracySection
from ..engine.directory import BuildDir
from ..export.directory import ONNX_FILE, ExportDir
from ..model.tokenizer import load_text
from ..precision.calibration import EVAL_DATA, read_texts
from .backends import OrtBackend, open_backend


class GateFailed(TrtglmError):
    exit_code = 3


def evaluate(build_dir: str | Path, reference: str | Path | None = None, data: str | Path | None = None,
             samples: int = 16, seq_len: int = 256, backend: str = "auto", devices: list[int] | None = None) -> dict:
    build_dir = Path(build_dir)
    manifest = BuildDir(build_dir).manifest
    if manifest["recipe"]["resolved"]["shapes"].get("logits") == "last":
        raise UsageError(f"{build_dir} computes the logits of the last position only (shapes.logits: last); "
                         "perplexity needs every position",
                         hint="evaluate a build made with --logits all (the build's --gate runs before that step)")
    reference = Path(reference or manifest["source"]["export_dir"])
    if manifest["precision"]["dtype"] == "bf16" and backend != "trt":
        raise TrtglmError("bf16 cannot run on ONNX Runtime's CPU provider: evaluate it on the engine with a GPU")
    ExportDir(reference).require_fp32_reference()
    candidate, why = open_backend(build_dir, backend, devices=devices)
    with closing(candidate):
        result = {"backend": why, **compare(candidate, reference, load_text(build_dir), data, samples, seq_len)}
    limits = manifest["recipe"]["resolved"]["accuracy"]
    if any(v is None for v in limits.values()):  # builds from before per-precision goals
        limits = AccuracySection.model_validate(limits).for_dtype(manifest["precision"]["dtype"]).model_dump()
    result["gate"] = judge(result, AccuracySection.model_validate(limits))
    return result


def compare(candidate, reference: Path, text, data: str | Path | None, samples: int, seq_len: int) -> dict:
    """Perplexity of `candidate` (a backend) and of the fp32 export `reference` on windows of held-out text.
    Callers check that `reference` is an fp32 export (evaluate here, the gate's in build)."""
    limit = min(candidate.max_seq_len, int((ExportDir(reference).meta or {}).get("max_seq_len") or candidate.max_seq_len))
    if seq_len > limit:
        raise UsageError(f"--seq-len {seq_len} exceeds the max_seq_len {limit} of the build or its reference",
                         hint=f"evaluate windows of at most {limit} tokens")
    reason = candidate.admits(1, seq_len, 0)
    if reason:
        raise TrtglmError(f"windows of --seq-len {seq_len} cannot run on this build: {reason}")
    windows = _windows([text.encode(t) for t in read_texts(data or EVAL_DATA)], seq_len, samples)
    ref = OrtBackend(reference / ONNX_FILE)
    nll_c, nll_r, agree, cosines, count = 0.0, 0.0, 0, [], 0
    for ids in windows:
        x, y = np.array([ids[:-1]]), np.array(ids[1:])
        n = len(y)
        args = (x, np.ones((1, n), np.int64), np.arange(n)[None])
        lc = candidate.forward(*args, candidate.new_cache(1))[0][0].astype(np.float64)
        lr = ref.forward(*args, ref.new_cache(1))[0][0].astype(np.float64)
        nll_c += _nll(lc, y)
        nll_r += _nll(lr, y)
        agree += int((lc.argmax(-1) == lr.argmax(-1)).sum())
        cosines.append((lc * lr).sum(-1) / (np.linalg.norm(lc, axis=-1) * np.linalg.norm(lr, axis=-1)))
        count += n
    ppl_c, ppl_r = float(np.exp(nll_c / count)), float(np.exp(nll_r / count))
    return {"tokens": count, "windows": len(windows), "candidate_perplexity": ppl_c,
            "reference_perplexity": ppl_r, "perplexity_delta": (ppl_c - ppl_r) / ppl_r,
            "next_token_agreement": agree / count, "logits_cosine": float(np.concatenate(cosines).mean())}

def _windows(token_lists: list[list[int]], seq_len: int, samples: int) -> list[list[int]]:
    stream = [t for ids in token_lists for t in ids]
    if len(stream) < seq_len + 1:
        raise TrtglmError(f"the evaluation text has {len(stream)} tokens, fewer than --seq-len {seq_len} + 1")
    return [stream[i:i + seq_len + 1] for i in range(0, len(stream) - seq_len, seq_len)][:samples]


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    m = logits.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    return float((logz - logits[np.arange(len(targets)), targets]).sum())


def judge(r: dict, limits: AccuracySection) -> dict:
    failures = []
    if r["perplexity_delta"] > limits.max_ppl_delta:
        failures.append(f"perplexity +{r['perplexity_delta']:.2%} > {limits.max_ppl_delta:.2%}")
    if r["next_token_agreement"] < limits.min_next_token_agreement:
        failures.append(f"agreement {r['next_token_agreement']:.1%} < {limits.min_next_token_agreement:.0%}")
    if r["logits_cosine"] < limits.min_logits_cosine:
        failures.append(f"logits cosine {r['logits_cosine']:.4f} < {limits.min_logits_cosine}")
    keys = ("max_ppl_delta", "min_next_token_agreement", "min_logits_cosine")
    return {"passed": not failures, "failures": failures, "limits": {k: getattr(limits, k) for k in keys}}

