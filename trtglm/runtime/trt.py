"""The TensorRT engine as a generation backend (pycuda, imported only here and only when used).

    manifest checks ─ deserialize ─ allocate once for the maximum shapes ─ per step:
    set_input_shape / set_tensor_address ─ execute_async_v3 ─ logits to pinned host memory
    KV cache: two device buffer sets; each step reads past from one and writes present to the other
    (the graph's present = past + new, so swapping needs no copy and no host round trip).
    Static cache (`kv_cache: static`): one buffer set of max_seq_len slots, bound as both past and present
    (TensorRT's KV-cache-update layer writes the new tokens in place at `cache_position`; its documentation
    requires the output to share the cache input's device address).
    TensorRT-RTX only (its IRuntimeConfig): CUDA graph capture of each step shape (`cuda_graphs=True`:
    WHOLE_GRAPH_CAPTURE, replayed when a shape recurs, as every decode step of a static cache does), and a
    runtime cache of the kernels it compiles for this GPU on first use, kept between sessions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.dtypes import BY_NUMPY
from ..core.errors import TrtglmError
from ..core.files import atomic_file, cache_dir
from ..engine.directory import BuildDir
from ..engine.inspect import verify
from ..engine.static_cache import CACHE_POSITION, step_inputs
from ..engine.tensorrt import RTX_TARGETS, gpu_compute_capability, import_backend

LOG = logging.getLogger(__name__)  # the library never prints; the command line shows warnings


@dataclass(frozen=True)
class Buffer:
    name: str
    dtype: str
    max_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.max_shape) * BY_NUMPY[self.dtype].bytes


def plan_buffers(manifest: dict) -> dict[str, Buffer]:
    """Every IO tensor at the largest shape any profile allows (one allocation per session)."""
    io, profiles = manifest.get("io"), manifest.get("profiles")
    if not io or not profiles:
        raise TrtglmError("manifest has no IO spec or profiles: not an engine build")
    largest: dict[str, tuple[int, ...]] = {}
    for profile in profiles:
        for name, (_, _, mx) in profile.items():
            largest[name] = tuple(max(a, b) for a, b in zip(largest.get(name, mx), mx))
    out = {}
    for spec in io["inputs"]:
        out[spec["name"]] = Buffer(spec["name"], spec["dtype"], largest[spec["name"]])
    batch, tokens = largest["input_ids"]
    total = largest["attention_mask"][1]
    for spec in io["outputs"]:
        dims = []
        for d in spec["shape"]:
            dims.append({"batch": batch, "sequence": tokens, "total_sequence": total}.get(d, d)
                        if isinstance(d, str) else d)
        out[spec["name"]] = Buffer(spec["name"], spec["dtype"], tuple(dims))
    return out


def unavailable_reason(build: BuildDir | str | Path, cc: str | None | bool = False) -> str | None:
    """Why the engine cannot run here (None: it can). `cc` overrides GPU detection (tests)."""
    build = build if isinstance(build, BuildDir) else BuildDir(build)
    manifest = build.manifest
    if not build.engine.is_file():
        return "the build has no engine (it was built with --onnx-only)"
    cc = gpu_compute_capability() if cc is False else cc
    if cc is None:
        return "there is no GPU"
    targets = manifest.get("targets") or []
    backend = (manifest.get("backend") or {}).get("name")
    if backend == "tensorrt_rtx" and cc not in targets:
        if cc not in RTX_TARGETS:  # seen on an H100: its runtime refuses every engine, even one built there
            return (f"this GPU is {cc}, which TensorRT-RTX cannot run (it targets {', '.join(RTX_TARGETS)}): "
                    "build the engine with the full TensorRT (builder.backend: tensorrt) on this GPU")
        return f"this GPU is {cc} and the engine was built for {', '.join(targets)}"
    try:
        trt = import_backend(backend or "auto")
    except TrtglmError:
        return f"the {backend} Python module is not installed"
    version = (manifest.get("backend") or {}).get("version")
    if version and trt.__version__ != version:
        return f"the engine was built with {backend} {version}, this machine has {trt.__version__}"
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        return "pycuda is not installed (pip install 'trtglm[cuda]')"
    return None


def cuda_graph_refusal(trt) -> str | None:
    """Why this TensorRT module cannot capture CUDA graphs of engine steps itself (None: it can)."""
    if not hasattr(trt, "CudaGraphStrategy"):
        return (f"{trt.__name__} {trt.__version__} has no built-in CUDA graph capture (IRuntimeConfig's "
                "cuda_graph_strategy is TensorRT-RTX's)")
    return None


def runtime_cache_file(manifest: dict) -> Path:
    """Where TensorRT-RTX's runtime cache of one engine lives (its kernels compiled for this machine's GPU)."""
    return cache_dir() / "runtime" / f"{manifest['files']['sha256']['model.engine'][:32]}.bin"


@dataclass
class TrtCache:
    batch: int
    length: int
    buffers: list  # device allocations holding past_key_values in input order


class TrtBackend:
    name = "trt"
    int8_gemm = None  # TensorRT's own int8 kernels

    def __init__(self, build_dir: str | Path, cuda_graphs: bool = False):
        import pycuda.autoinit  # noqa: F401 - creates the context
        import pycuda.driver as cuda

        build = build_dir if isinstance(build_dir, BuildDir) else BuildDir(build_dir)
        build_dir = build.path
        verify(build_dir)  # hashes and TensorRT version, with clear messages
        manifest = build.manifest
        trt = import_backend(manifest["backend"]["name"])
        self._cuda, self._trt = cuda, trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(build.engine.read_bytes())
        if self.engine is None:
            raise TrtglmError(f"{build.engine}: TensorRT could not load it on this GPU")
        self._runtime_cache, self._runtime_cache_file = None, runtime_cache_file(manifest)
        self.context = self._execution_context(cuda_graphs)
        self.stream = cuda.Stream()
        self.buffers = plan_buffers(manifest)
        self.max_seq_len = int(manifest["max_seq_len"])
        self.vocab_size = self.buffers["logits"].max_shape[-1]
        self.past_names = [n for n in self.buffers if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.static = CACHE_POSITION in self.buffers
        self._slots = self.buffers[self.past_names[0]].max_shape[2]  # static: the cache's fixed length
        self._dev = {n: cuda.mem_alloc(b.nbytes) for n, b in self.buffers.items()
                     if not n.startswith(("past_key_values.", "present."))}
        self._sets = [[cuda.mem_alloc(self.buffers[n].nbytes) for n in self.present_names]
                      for _ in range(1 if self.static else 2)]
        if self.static:  # empty slots are masked, but 0 x NaN of uninitialized memory would still be NaN
            for buffer, name in zip(self._sets[0], self.present_names):
                cuda.memset_d8(buffer, 0, self.buffers[name].nbytes)
        self._logits = cuda.pagelocked_empty(math.prod(self.buffers["logits"].max_shape), np.float32)
        self._elt = BY_NUMPY[self.buffers[self.past_names[0]].dtype].bytes
        self._kv, self._d = self.buffers[self.past_names[0]].max_shape[1], self.buffers[self.past_names[0]].max_shape[3]

    def _execution_context(self, cuda_graphs: bool):
        trt, engine = self._trt, self.engine
        reason = cuda_graph_refusal(trt) if cuda_graphs else None
        if reason:
            raise TrtglmError(f"--cuda-graphs: {reason}")
        if not hasattr(engine, "create_runtime_config"):  # TensorRT before 10.11
            return engine.create_execution_context()
        config = engine.create_runtime_config()
        if cuda_graphs:
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        if hasattr(config, "create_runtime_cache"):
            self._runtime_cache = config.create_runtime_cache()
            f = self._runtime_cache_file
            if f.is_file() and not self._runtime_cache.deserialize(f.read_bytes()):
                LOG.warning("%s was written for another GPU, driver or TensorRT-RTX: compiling anew", f)
            config.set_runtime_cache(self._runtime_cache)
        context = engine.create_execution_context(config)
        if context is None:
            raise TrtglmError("TensorRT could not create an execution context for the engine")
        return context

    def close(self) -> None:
        """Keep the kernels TensorRT-RTX compiled this session for the next one (written atomically)."""
        if self._runtime_cache is None:
            return
        with atomic_file(self._runtime_cache_file) as tmp:
            tmp.write_bytes(bytes(self._runtime_cache.serialize()))

    def new_cache(self, batch: int) -> TrtCache:
        return TrtCache(batch, 0, self._sets[0])

    def _positions(self, cache: TrtCache) -> int:
        """Sequence positions a cache buffer holds: every slot of a static cache, else the filled length."""
        return self._slots if self.static else cache.length

    def _other(self, buffers) -> list:
        """Where a step writes present: the other buffer set, or for a static cache the one set, in place."""
        return self._sets[1] if buffers is self._sets[0] and not self.static else self._sets[0]

    def forward(self, input_ids, attention_mask, position_ids, cache: TrtCache):
        cuda = self._cuda
        b, s = input_ids.shape
        total = cache.length + s
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.static:  # the mask covers every slot; the new tokens go to slot cache.length
            feeds |= step_inputs(attention_mask, cache.length, self._slots)
        for name, array in feeds.items():
            host = np.ascontiguousarray(array, dtype=np.int64)
            cuda.memcpy_htod_async(self._dev[name], host, self.stream)
            self.context.set_input_shape(name, host.shape)
            self.context.set_tensor_address(name, int(self._dev[name]))
        out = self._other(cache.buffers)
        for i, (past, present) in enumerate(zip(self.past_names, self.present_names)):
            self.context.set_input_shape(past, (b, self._kv, self._positions(cache), self._d))
            self.context.set_tensor_address(past, int(cache.buffers[i]))
            self.context.set_tensor_address(present, int(out[i]))
        self.context.set_tensor_address("logits", int(self._dev["logits"]))
        if not self.context.execute_async_v3(self.stream.handle):
            raise TrtglmError("TensorRT failed to run the engine step")
        shape = tuple(self.context.get_tensor_shape("logits"))  # [b, s, V], or [b, 1, V] with `logits: last`
        n = math.prod(shape)
        cuda.memcpy_dtoh_async(self._logits[:n], self._dev["logits"], self.stream)
        self.stream.synchronize()
        return self._logits[:n].reshape(shape).copy(), TrtCache(b, total, out)

    def expand_cache(self, cache: TrtCache, batch: int) -> TrtCache:
        """A batch-1 cache (a prefix) tiled to `batch` rows in a working buffer set."""
        cuda = self._cuda
        out = self._other(cache.buffers)
        row = self._kv * self._positions(cache) * self._d * self._elt
        for src, dst in zip(cache.buffers, out):
            for r in range(batch):
                cuda.memcpy_dtod_async(int(dst) + r * row, src, row, self.stream)
        self.stream.synchronize()
        return TrtCache(batch, cache.length, out)

    def snapshot(self, cache: TrtCache) -> TrtCache:
        """A copy in its own device memory, so later steps cannot overwrite it (prefix reuse)."""
        cuda = self._cuda
        size = cache.batch * self._kv * self._positions(cache) * self._d * self._elt
        copies = []
        for src in cache.buffers:
            dst = cuda.mem_alloc(max(size, 1))
            cuda.memcpy_dtod_async(dst, src, size, self.stream)
            copies.append(dst)
        self.stream.synchronize()
        return TrtCache(cache.batch, cache.length, copies)
