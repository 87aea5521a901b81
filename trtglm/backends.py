"""Model backends behind one interface: ONNX Runtime over BUILD_DIR/model.onnx, or the TensorRT engine.

    forward(input_ids [B,S], attention_mask [B,P+S], position_ids [B,S], cache) -> (logits [B,S,V] fp32, cache)

The cache is the backend's own (ONNX Runtime values, or device buffers), never copied to numpy
between steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import TrtglmError


class Backend(Protocol):
    name: str
    max_seq_len: int
    vocab_size: int

    def new_cache(self, batch: int): ...

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache): ...

    def expand_cache(self, cache, batch: int): ...


def read_manifest(build_dir: Path) -> dict:
    f = build_dir / "manifest.json"
    if not f.is_file():
        raise TrtglmError(f"{build_dir}: no manifest.json (not a `trtglm build` directory)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise TrtglmError(f"{f}: corrupt ({e})") from None


def _kv_specs(build_dir: Path, manifest: dict) -> tuple[list[dict], dict]:
    export = json.loads((build_dir / "export.json").read_text()) if (build_dir / "export.json").is_file() else None
    io = manifest.get("io") or (export or {}).get("io")
    if io is None:
        raise TrtglmError(f"{build_dir}: no IO description (manifest io / export.json)")
    return io["inputs"], (export or {}).get("config", {})


class OrtBackend:
    """BUILD_DIR/model.onnx in ONNX Runtime (CPU, or CUDA where onnxruntime-gpu finds a GPU)."""

    name = "ort"

    def __init__(self, build_dir: str | Path, threads: int = 0, device: str = "auto"):
        import onnxruntime as ort

        build_dir = Path(build_dir)
        manifest = read_manifest(build_dir)
        inputs, config = _kv_specs(build_dir, manifest)
        self.max_seq_len = int(manifest.get("max_seq_len") or config.get("max_position_embeddings", 2048))
        self.vocab_size = int(config.get("vocab_size", 0))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and _cuda_usable(ort):
            providers.insert(0, "CUDAExecutionProvider")
        elif device == "cuda":
            raise TrtglmError("--device cuda: ONNX Runtime has no usable CUDA provider here")
        self.session = ort.InferenceSession(str(build_dir / "model.onnx"), opts, providers=providers)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.past = [i for i in inputs if i["name"].startswith("past_key_values.")]
        self.present = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        self._dtype = {"float32": np.float32, "float16": np.float16}.get(self.past[0]["dtype"])
        if self._dtype is None:
            raise TrtglmError(f"ONNX Runtime cannot run a {self.past[0]['dtype']} KV cache on this machine")
        self._ort = ort

    def new_cache(self, batch: int):
        return [self._ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, p["shape"][1], 0, p["shape"][3]), self._dtype))
                for p in self.past]

    def expand_cache(self, cache, batch: int):
        return [self._ort.OrtValue.ortvalue_from_numpy(np.repeat(v.numpy(), batch, axis=0)) for v in cache]

    def forward(self, input_ids, attention_mask, position_ids, cache):
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for spec, value in zip(self.past, cache):
            binding.bind_ortvalue_input(spec["name"], value)
        binding.bind_output("logits")  # ORT allocates; presents stay OrtValues for the next step
        for name in self.present:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        return logits.numpy(), presents


def _cuda_usable(ort) -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    from .inspect import _gpu_present

    return _gpu_present()


def open_backend(build_dir: str | Path, kind: str = "auto", threads: int = 0) -> tuple[Backend, str]:
    """The backend and a sentence saying which and why (auto: the engine when a GPU and TensorRT are there)."""
    build_dir = Path(build_dir)
    if kind in ("auto", "trt"):
        from .trt_backend import TrtBackend, unavailable_reason

        reason = unavailable_reason(build_dir)
        if reason is None:
            return TrtBackend(build_dir), "TensorRT engine"
        if kind == "trt":
            raise TrtglmError(f"--backend trt: {reason}")
        backend = OrtBackend(build_dir, threads=threads)
        return backend, f"ONNX Runtime ({backend.device}) over model.onnx, because {reason}"
    if kind == "ort":
        backend = OrtBackend(build_dir, threads=threads)
        return backend, f"ONNX Runtime ({backend.device}) over model.onnx"
    raise TrtglmError(f"unknown backend {kind!r}: auto, trt or ort")
