"""Model backends behind one interface: ONNX Runtime over BUILD_DIR/model.onnx, or the TensorRT engine.

    forward(input_ids [B,S], attention_mask [B,P+S], position_ids [B,S], cache) -> (logits [B,S,V] fp32, cache)

The cache is the backend's own (ONNX Runtime values, or device buffers), never copied to numpy
between steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import TrtglmError, UsageError
from .static_cache import CACHE_POSITION, step_inputs


class Backend(Protocol):
    name: str
    max_seq_len: int
    vocab_size: int

    def new_cache(self, batch: int): ...

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache): ...

    def expand_cache(self, cache, batch: int): ...

    def close(self) -> None: ...


@dataclass
class StaticCache:
    values: list  # OrtValues [B, KV, slots, D], written in place
    length: int  # slots filled


def read_manifest(build_dir: Path) -> dict:
    f = build_dir / "manifest.json"
    if not f.is_file():
        raise TrtglmError(f"{build_dir}: no manifest.json (not a `trtglm build` directory)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise TrtglmError(f"{f}: corrupt ({e})") from None


class OrtBackend:
    """A decoder graph in ONNX Runtime (CPU, or CUDA where onnxruntime-gpu finds a GPU).

    The cache layout is read from the session's own inputs, so any trtglm graph runs: an export,
    a build, or a test's. `low_memory` drops ONNX Runtime's arena (fp16 weights cast to fp32 per op
    are then freed at once); `optimize=False` turns its graph optimizations off; `profile=PREFIX` records
    ONNX Runtime's profile to PREFIX_<time>.json (`session.end_profiling()` returns the path).
    """

    name = "ort"

    def __init__(self, onnx_path: str | Path, *, max_seq_len: int | None = None, threads: int = 0,
                 device: str = "auto", optimize: bool = True, low_memory: bool = False, profile: str | Path | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(profile)
        if low_memory:
            opts.enable_cpu_mem_arena = False
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        providers: list = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and _cuda_usable(ort):
            # fp32 means fp32: the CUDA provider's default TF32 matmuls move an fp32 graph's logits by ~1e-2
            # (H100, measured), 100x the export's own tolerance against transformers.
            providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0"}))
        elif device == "cuda":
            raise TrtglmError("--device cuda: ONNX Runtime has no usable CUDA provider here")
        model = _session_graph(Path(onnx_path), opts, cpu=len(providers) == 1)
        self.session = ort.InferenceSession(model, opts, providers=providers)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        inputs = self.session.get_inputs()
        self.past = [i for i in inputs if i.name.startswith("past_key_values.")]
        self.present = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        self.vocab_size = self.session.get_outputs()[0].shape[-1]
        self.max_seq_len = max_seq_len or 1 << 30
        # a static cache (static_cache.py): fixed slots, updated in place, the write position as an input
        self.static = any(i.name == CACHE_POSITION for i in inputs)
        self._slots = self.past[0].shape[2] if self.static else 0  # positions a new cache holds
        if self.static:
            self.max_seq_len = min(self.max_seq_len, self._slots)
        self._dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(self.past[0].type)
        if self._dtype is None:
            raise TrtglmError(f"ONNX Runtime cannot run a {self.past[0].type} KV cache on this machine")
        self._ort = ort

    @classmethod
    def from_build(cls, build_dir: str | Path, threads: int = 0, **options) -> "OrtBackend":
        build_dir = Path(build_dir)
        manifest = read_manifest(build_dir)
        return cls(build_dir / "model.onnx", max_seq_len=int(manifest["max_seq_len"]), threads=threads, **options)

    def _on_device(self, array: np.ndarray):
        """An OrtValue where the session computes (the CUDA provider's memory, or the CPU): a cache bound there
        is read and, when static, written in place, with no copy to or from the host at any step."""
        return self._ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def new_cache(self, batch: int):
        values = [self._on_device(np.zeros((batch, p.shape[1], self._slots, p.shape[3]), self._dtype))
                  for p in self.past]
        return StaticCache(values, 0) if self.static else values

    def close(self) -> None:
        pass

    def expand_cache(self, cache, batch: int):
        """`cache` (batch 1, a prefix) copied into `batch` rows: later steps write the copy, never `cache`."""
        values = cache.values if self.static else cache
        tiled = [self._on_device(np.repeat(v.numpy(), batch, axis=0)) for v in values]  # once per request
        return StaticCache(tiled, cache.length) if self.static else tiled

    def forward(self, input_ids, attention_mask, position_ids, cache):
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        values = cache.values if self.static else cache
        for spec, value in zip(self.past, values):
            binding.bind_ortvalue_input(spec.name, value)
        binding.bind_output("logits")
        if self.static:  # the mask over every slot, the write position, and present written over past in place
            for name, array in step_inputs(attention_mask, cache.length, self._slots).items():
                binding.bind_cpu_input(name, array)
            for name, value in zip(self.present, values):
                binding.bind_ortvalue_output(name, value)
        else:  # ORT allocates; presents stay OrtValues for the next step
            binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
            for name in self.present:
                binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        if self.static:
            return logits.numpy(), StaticCache(values, cache.length + input_ids.shape[1])
        return logits.numpy(), presents


def _session_graph(onnx_path: Path, opts, cpu: bool) -> str | bytes:
    """What ONNX Runtime runs of `onnx_path`, rewritten in memory (the build's model.onnx is TensorRT's graph and
    stays as it is). A static cache's attention reads only the filled slots (cache_window.py). On the CPU, W8A8
    graphs (int8/fp8 Q/DQ, fp16 around) have no GEMM: it would dequantize every weight at every step (measured
    3 tok/s on 136M). Their int8 MatMuls become integer GEMMs (integer_gemm.py: 1 byte per weight read, about
    100 tok/s); the weight DQs of the others (fp8) are folded at load, the same values computed once into fp32
    (about 50 tok/s)."""
    import onnx_ir as ir

    from .cache_window import window
    from .integer_gemm import lower

    model = ir.load(onnx_path)  # the weights stay in the data file
    changed = window(model)
    if cpu and any(node.op_type == "QuantizeLinear" for node in model.graph):
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
        changed += lower(model)
    if not changed:
        return str(onnx_path)
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(onnx_path.parent))
    return ir.to_proto(model).SerializeToString()


def _static_cache(manifest: dict) -> bool:
    return any(spec["name"] == CACHE_POSITION for spec in (manifest.get("io") or {}).get("inputs", []))


def _cuda_usable(ort) -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    from .trt_backend import gpu_compute_capability

    return gpu_compute_capability() is not None


def open_backend(build_dir: str | Path, kind: str = "auto", threads: int = 0,
                 cuda_graphs: bool = False) -> tuple[Backend, str]:
    """The backend and a sentence saying which and why (auto: the engine when a GPU and TensorRT are there).
    `cuda_graphs`: the engine's steps captured as CUDA graphs (TensorRT-RTX); refused on ONNX Runtime."""
    build_dir = Path(build_dir)
    if cuda_graphs and kind != "ort" and not _static_cache(read_manifest(build_dir)):
        raise UsageError("--cuda-graphs needs a build with a static KV cache (trtglm build --kv-cache static): a "
                         "dynamic cache changes shape at every step, so no captured step would recur")
    if kind in ("auto", "trt"):
        from .trt_backend import TrtBackend, unavailable_reason

        reason = unavailable_reason(build_dir)
        if reason is None:
            return TrtBackend(build_dir, cuda_graphs=cuda_graphs), "TensorRT engine" + (
                ", CUDA graphs" if cuda_graphs else "")
        if kind == "trt":
            raise TrtglmError(f"--backend trt: {reason}")
        if cuda_graphs:
            raise TrtglmError(f"--cuda-graphs needs the TensorRT engine: {reason}")
        backend = OrtBackend.from_build(build_dir, threads=threads)
        return backend, f"ONNX Runtime ({backend.device}) over model.onnx, because {reason}"
    if kind == "ort":
        if cuda_graphs:
            raise UsageError("--cuda-graphs applies to the TensorRT engine, not to --backend ort")
        backend = OrtBackend.from_build(build_dir, threads=threads)
        return backend, f"ONNX Runtime ({backend.device}) over model.onnx"
    raise TrtglmError(f"unknown backend {kind!r}: auto, trt or ort")
