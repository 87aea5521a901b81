"""A stand-in for the runtime half of `tensorrt_rtx` and `tensorrt`: an engine that follows TensorRT's name-based IO
contract and enforces its optimization profiles, computing each step with ONNX Runtime over the build's graph.

Strict where TensorRT is strict:
- `set_input_shape` returns False for an unknown input, a wrong rank, or a shape outside the active profile's
  [min, max]; a profile is chosen with `set_optimization_profile_async` (default 0), after which every input
  shape must be set again;
- `execute_async_v3` returns False (the reason in `context.errors`) when an input has no shape or address, an
  output has no address, a binding does not fit its allocation, an output overlaps an input or another output
  (except a static cache's present at exactly its past's address, which TensorRT's KV-cache-update layer
  requires), or the runtime cache the context was made with has been freed;
- the step runs on its stream: inputs are read from device memory when the stream gets to it.

Engines are known by the sha256 of their bytes (`register(build_dir)`), since the simulation cannot read a
real plan file; what one computes is the build's model.onnx, on ONNX Runtime's CPU provider.
"""

from __future__ import annotations

import hashlib
import json
import types
import weakref
from pathlib import Path

import numpy as np

from . import cuda

ENGINES: dict[str, tuple[Path, int | None]] = {}  # sha256 -> build dir, stage (None: the build's one engine)
EVENTS: list[str] = []  # destruction order of contexts and runtime caches ("context", "runtime cache")


def register(build_dir: Path) -> None:
    """The build's engine, or each engine of a staged build."""
    build_dir = Path(build_dir)
    stages = json.loads((build_dir / "manifest.json").read_text()).get("stages") or []
    engines = [(build_dir / "stages" / s["dir"] / "model.engine", i) for i, s in enumerate(stages)] or [
        (build_dir / "model.engine", None)]
    for engine, stage in engines:
        ENGINES[hashlib.sha256(engine.read_bytes()).hexdigest()] = (build_dir, stage)


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, severity: int = 2):
        self.severity = severity


class TensorIOMode:
    NONE, INPUT, OUTPUT = range(3)


class DataType:
    FLOAT, HALF, INT8, INT32, BOOL, UINT8, FP8, BF16, INT64 = "float32", "float16", "int8", "int32", "bool", \
        "uint8", "fp8", "bfloat16", "int64"


def nptype(dtype: str):
    return np.dtype(dtype).type


class CudaGraphStrategy:
    DISABLED, WHOLE_GRAPH_CAPTURE = range(2)


class RuntimeCache:
    MAGIC = b"simulated runtime cache"

    def serialize(self) -> bytes:
        return self.MAGIC

    def deserialize(self, data: bytes) -> bool:
        return bytes(data) == self.MAGIC

    def __del__(self):
        EVENTS.append("runtime cache")


class RuntimeConfig:
    """The full TensorRT's IRuntimeConfig: neither CUDA graph capture nor a runtime cache."""

    _cache_ref = None


class RtxRuntimeConfig(RuntimeConfig):
    """TensorRT-RTX's: CUDA graph capture of each step shape, and a runtime cache of compiled kernels."""

    def __init__(self):
        self.cuda_graph_strategy = CudaGraphStrategy.DISABLED

    def create_runtime_cache(self) -> RuntimeCache:
        return RuntimeCache()

    def set_runtime_cache(self, cache: RuntimeCache) -> bool:
        self._cache_ref = weakref.ref(cache)  # as the real binding: it does not keep the cache alive
        return True


class Runtime:
    def __init__(self, logger: Logger):
        self.logger = logger
        self.module = None  # set by the module that made it

    def deserialize_cuda_engine(self, data: bytes):
        known = ENGINES.get(hashlib.sha256(bytes(data)).hexdigest())
        return None if known is None else Engine(*known, self.module)


class Engine:
    def __init__(self, build_dir: Path, stage: int | None, module):
        manifest = json.loads((build_dir / "manifest.json").read_text())
        if stage is not None:  # one stage's engine: its own io, profiles and graph
            manifest = manifest["stages"][stage]
            build_dir = build_dir / "stages" / manifest["dir"]
        self._module = module
        self._rtx = module.__name__ == "tensorrt_rtx"
        self._inputs = {s["name"]: s for s in manifest["io"]["inputs"]}
        self._outputs = {s["name"]: s for s in manifest["io"]["outputs"]}
        self._names = [*self._inputs, *self._outputs]
        self.profiles = [{name: [tuple(d) for d in dims] for name, dims in p.items()} for p in manifest["profiles"]]
        self._onnx = build_dir / "model.onnx"
        self._session = None
        self.gpu = cuda.current()  # the engine's weights live on the GPU whose context was current
        module.DESERIALIZED.append(build_dir)

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> int:
        return TensorIOMode.INPUT if name in self._inputs else TensorIOMode.OUTPUT if name in self._outputs \
            else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> str:
        return self._spec(name)["dtype"]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(-1 if isinstance(d, str) else d for d in self._spec(name)["shape"])

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return list(self.profiles[profile][name])

    def create_runtime_config(self) -> RuntimeConfig:
        return RtxRuntimeConfig() if self._rtx else RuntimeConfig()

    def create_execution_context(self, config: RuntimeConfig | None = None):
        return Context(self, config)

    def _spec(self, name: str) -> dict:
        return self._inputs.get(name) or self._outputs[name]

    def session(self):
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(str(self._onnx), opts, providers=["CPUExecutionProvider"])
        return self._session


class Context:
    def __init__(self, engine: Engine, config: RuntimeConfig | None):
        self.engine = engine
        self.active_optimization_profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.errors: list[str] = []
        self.steps: list[int] = []  # the profile each executed step ran under
        self.graphs = config is not None and getattr(config, "cuda_graph_strategy", 0) == \
            CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        self.captured: dict[tuple, int] = {}  # step shapes -> replays (CUDA graphs)
        self._cache_ref = config._cache_ref if config is not None else None

    def __del__(self):
        EVENTS.append("context")

    def set_optimization_profile_async(self, index: int, stream_handle: int) -> bool:
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        cuda.stream_of(stream_handle)
        self.active_optimization_profile = index
        self.shapes.clear()  # TensorRT: input shapes are set again for the new profile
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(d) for d in shape)
        profile = self.engine.profiles[self.active_optimization_profile]
        if name not in profile or len(shape) != len(profile[name][0]):
            return False
        low, _, high = profile[name]
        if any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        if self.engine.get_tensor_mode(name) == TensorIOMode.NONE:
            return False
        self.addresses[name] = int(address)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine._inputs:
            return self.shapes.get(name, self.engine.get_tensor_shape(name))
        sizes = {}
        for input_name, spec in self.engine._inputs.items():
            for d, n in zip(spec["shape"], self.shapes.get(input_name, ())):
                if isinstance(d, str):
                    sizes.setdefault(d, n)
        return tuple(sizes.get(d, -1) if isinstance(d, str) else d for d in self.engine._outputs[name]["shape"])

    def _nbytes(self, name: str) -> int:
        return int(np.prod(self.get_tensor_shape(name))) * np.dtype(self.engine.get_tensor_dtype(name)).itemsize

    def _check(self) -> list[str]:
        problems = []
        if self._cache_ref is not None and self._cache_ref() is None:
            problems.append("the runtime cache this context was made with has been freed")
        for name in self.engine._inputs:
            if name not in self.shapes:
                problems.append(f"input {name} has no shape set for profile {self.active_optimization_profile}")
            if name not in self.addresses:
                problems.append(f"input {name} has no address")
        for name in self.engine._outputs:
            if name not in self.addresses:
                problems.append(f"output {name} has no address")
        if problems:
            return problems
        spans = {}
        for name in self.engine._names:
            n = self._nbytes(name)
            try:
                self.engine.gpu.view(self.addresses[name], max(n, 1))
            except cuda.SimulatedCudaError as e:
                problems.append(f"{name}: {e}")
            spans[name] = (self.addresses[name], self.addresses[name] + n)
        static = "cache_position" in self.engine._inputs
        outputs = list(self.engine._outputs)
        for i, out in enumerate(outputs):
            a = spans[out]
            in_place = out.replace("present.", "past_key_values.") if out.startswith("present.") else None
            for other in [*self.engine._inputs, *outputs[:i]]:
                b = spans[other]
                if a[0] < b[1] and b[0] < a[1] and a[1] > a[0] and b[1] > b[0]:
                    if static and other == in_place and a == b:
                        continue  # the KV-cache-update layer writes its cache input in place
                    problems.append(f"output {out} overlaps {other}")
        return problems

    def execute_async_v3(self, stream_handle: int) -> bool:
        stream = cuda.stream_of(stream_handle)
        gpu = self.engine.gpu
        if stream.gpu is not gpu:
            raise cuda.SimulatedCudaError(f"an engine on GPU {gpu.index} run on a stream of GPU {stream.gpu.index}")
        self.errors = self._check()
        if self.errors:
            return False
        shapes = {name: self.get_tensor_shape(name) for name in self.engine._names}
        addresses = dict(self.addresses)
        self.steps.append(self.active_optimization_profile)
        if self.graphs:
            key = tuple(sorted(shapes.items()))
            self.captured[key] = self.captured.get(key, -1) + 1

        def run():
            feeds = {}
            for name in self.engine._inputs:
                dtype = np.dtype(self.engine.get_tensor_dtype(name))
                n = int(np.prod(shapes[name])) * dtype.itemsize
                feeds[name] = gpu.view(addresses[name], n).copy().view(dtype).reshape(shapes[name])
            results = self.engine.session().run(list(self.engine._outputs), feeds)
            for name, value in zip(self.engine._outputs, results):
                if tuple(value.shape) != shapes[name]:
                    raise cuda.SimulatedCudaError(f"{name}: computed {value.shape}, promised {shapes[name]}")
                data = np.ascontiguousarray(value, np.dtype(self.engine.get_tensor_dtype(name)))
                gpu.view(addresses[name], data.nbytes)[:] = data.reshape(-1).view(np.uint8)

        stream.enqueue(run)
        return True


def module(name: str, version: str) -> types.ModuleType:
    """A `tensorrt_rtx` (CUDA graphs, runtime cache) or `tensorrt` module of the given version."""
    m = types.ModuleType(name)
    m.__version__ = version
    m.DESERIALIZED = []  # build dirs, one per deserialization
    for obj in (Logger, TensorIOMode, DataType, nptype):
        setattr(m, obj.__name__, obj)
    if name == "tensorrt_rtx":
        m.CudaGraphStrategy = CudaGraphStrategy

    class BoundRuntime(Runtime):
        def __init__(self, logger):
            super().__init__(logger)
            self.module = m

    m.Runtime = BoundRuntime
    return m
