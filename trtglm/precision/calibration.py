"""Calibration data: text -> the model's tokens -> windows -> ONNX Runtime feeds (prefill, empty KV cache).

    calibration.jsonl | .txt ─ tokenizer.json ─ N windows of L tokens ─ reader(io) ─> ORT calibrator
    fingerprint = sha256(window tokens, N, L)   (the cache key adds the graph and the method)

Ranges themselves are computed and cached by ONNX Runtime's calibrators (`trtglm.precision`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.dtypes import BY_NUMPY
from ..core.errors import TrtglmError
from ..model.tokenizer import load_text

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "calibration.jsonl"  # package data
EVAL_DATA = DEFAULT_DATA.with_name("eval.jsonl")


class CalibrationError(TrtglmError):
    exit_code = 2


def read_texts(path: str | Path) -> list[str]:
    """JSONL with a "text" field per line, or plain text (one document)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: no such data file", hint="pass a JSONL file with a \"text\" field per line")
    try:
        content = path.read_text()
    except UnicodeDecodeError:
        raise CalibrationError(f"{path}: not UTF-8 text") from None
    if path.suffix != ".jsonl":
        texts = [content]
    else:
        texts = []
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                    text = None
                if not isinstance(text, str):
                    raise CalibrationError(f"{path}:{n}: expected a JSON object with a \"text\" string")
                texts.append(text)
    if not any(t.strip() for t in texts):
        raise CalibrationError(f"{path}: no text")
    return texts


def token_windows(path: str | Path, tokenizer_dir: str | Path, seq_len: int, samples: int, vocab_size: int,
                  what: str = "calibration") -> np.ndarray:
    """[samples, seq_len] int64: consecutive windows of the concatenated, tokenized text."""

    texts, text = read_texts(path), load_text(tokenizer_dir)
    stream = [t for document in texts for t in text.encode(document)]
    if stream and max(stream) >= vocab_size:
        raise CalibrationError(f"{path}: the tokenizer in {tokenizer_dir} produces id {max(stream)}, outside the "
                               f"model's vocabulary of {vocab_size}: tokenizer and model do not match")
    available = len(stream) // seq_len
    if available == 0:
        raise CalibrationError(f"{path}: {len(stream)} tokens, shorter than the {what} sequence length {seq_len}",
                               hint="use more text or a shorter --calib-seq-len")
    if available < samples:
        raise CalibrationError(f"{path}: {len(stream)} tokens make {available} windows of {seq_len}, fewer than the "
                               f"{samples} samples asked for", hint="lower --calib-samples or --calib-seq-len")
    return np.array(stream[:samples * seq_len], dtype=np.int64).reshape(samples, seq_len)


@dataclass(frozen=True)
class CalibrationSet:
    data: Path
    windows: np.ndarray  # [samples, seq_len]
    method: str

    @classmethod
    def load(cls, data: str | Path | None, tokenizer_dir: Path, samples: int, seq_len: int, method: str,
             vocab_size: int) -> "CalibrationSet":
        data = Path(data) if data else DEFAULT_DATA
        return cls(data, token_windows(data, tokenizer_dir, seq_len, samples, vocab_size), method)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.windows.tobytes())
        h.update(str(self.windows.shape).encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"data": str(self.data), "samples": int(self.windows.shape[0]), "seq_len": int(self.windows.shape[1]),
                "method": self.method, "tokens_sha256": self.fingerprint}

    def reader(self, inputs: list[dict], on_sample=None, stage_inputs=None):
        """An ONNX Runtime CalibrationDataReader over the windows, one prefill each, KV cache empty.
        `stage_inputs(i)`: a later stage's hidden states for window i (engine/staged_build.py)."""
        from onnxruntime.quantization import CalibrationDataReader

        windows = self.windows

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.i = 0

            def get_next(self):
                if self.i == len(windows):
                    return None
                ids = windows[self.i:self.i + 1]
                extra = stage_inputs(self.i) if stage_inputs else {}
                self.i += 1
                if on_sample:
                    on_sample(self.i, len(windows))
                return _feeds(inputs, ids) | extra

            def __len__(self):
                return len(windows)

            def set_range(self, start_index: int, end_index: int):  # ORT's strided calibration
                self.i = start_index

        return Reader()


def _feeds(inputs: list[dict], ids: np.ndarray) -> dict[str, np.ndarray]:
    b, n = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, n), np.int64),
             "position_ids": np.broadcast_to(np.arange(n, dtype=np.int64), (b, n)).copy()}
    for spec in inputs:
        if spec["name"].startswith("past_key_values."):
            _, heads, _, dim = spec["shape"]
            feeds[spec["name"]] = np.zeros((b, heads, 0, dim), BY_NUMPY[spec["dtype"]].numpy)
    return {k: v for k, v in feeds.items() if k in {s["name"] for s in inputs}}
