"""The TensorRT engine as a generation backend (pycuda, imported only here and only when used).

    manifest checks ─ deserialize ─ allocate once for the maximum shapes ─ per step:
    set_input_shape / set_tensor_address ─ execute_async_v3 ─ logits to pinned host memory
    KV cache: two device buffer sets; each step reads past from one and writes present to the other
    (the graph's present = past + new, so swapping needs no copy and no host round trip).
    Static cache (`kv_cache: static`): one buffer set of max_seq_len slots, bound as both past and present
    (TensorRT's KV-cache-update layer writes the new tokens in place at `cache_position`; its documentation
    requires the output to share the cache input's device address).
    Devices: each engine runs in the primary CUDA context of its device, made current around everything it does;
    a staged build's stages may sit on several devices (`devices`), the hidden states copied from one device to
    the next where a stage boundary crosses them (`memcpy_peer`), and read in place where it does not.
    TensorRT-RTX only (its IRuntimeConfig): CUDA graph capture of each step shape (`cuda_graphs=True`:
    WHOLE_GRAPH_CAPTURE, replayed when a shape recurs, as every decode step of a static cache does), and a
    runtime cache of the kernels it compiles for this GPU on first use, kept between sessions.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.dtypes import BY_NUMPY
from ..core.errors import TrtglmError, UsageError
from ..core.files import atomic_file, cache_dir
from ..engine.directory import ENGINE_FILE, BuildDir
from ..engine.inspect import verify
from ..engine.static_cache import CACHE_POSITION, step_inputs
from ..engine.tensorrt import (
    RTX_TARGETS,
    gpu_compute_capability,
    import_backend,
    version_mismatch,
)

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
    """Every IO tensor of one engine (a build's manifest, or a staged build's stage entry) at the largest shape
    any profile allows (one allocation per session)."""
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
    batch, tokens = largest["position_ids"]
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
    engines = [d / ENGINE_FILE for d in build.stages] or [build.engine]
    if build.packed == "cpu":
        return "the build is packed for the CPU (trtglm pack --for cpu): it holds no engine"
    if not all(e.is_file() for e in engines):
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
    mismatch = version_mismatch(trt, manifest.get("backend") or {})
    if mismatch:
        return mismatch
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


def runtime_cache_file(manifest: dict, engine: str = ENGINE_FILE) -> Path:
    """Where TensorRT-RTX's runtime cache of one engine lives (its kernels compiled for this machine's GPU);
    `engine` is the engine file's name in the build (a staged build's: stages/NN/model.engine)."""
    return cache_dir() / "runtime" / f"{manifest['files']['sha256'][engine][:32]}.bin"


@dataclass(frozen=True)
class DeviceTensor:
    """Hidden states a stage left on the device for the next one: where, their shape, and the device (its
    context)."""

    address: int
    shape: tuple[int, ...]
    device: int = 0
    context: object = None


@dataclass
class TrtCache:
    batch: int
    length: int
    buffers: list  # device allocations holding past_key_values in input order


class TrtBackend:
    """The engine as a `Backend`. Each step picks the optimization profile that admits its shapes (split
    profiles: prefill, then decode); a step no profile admits, or a batch past the engine's limits, is refused
    with one line before anything reaches the device. `stage`: one stage's engine of a staged build, which reads
    and writes hidden states (`open_engines` chains them); `device`: the CUDA device it runs on, and
    `entry_device` the one its hidden states come from (another: they are copied over at each step)."""

    name = "trt"
    int8_gemm = None  # TensorRT's own int8 kernels

    def __init__(self, build_dir: str | Path, cuda_graphs: bool = False, stage: int | None = None,
                 verified: bool = False, device: int = 0, entry_device: int | None = None):
        import pycuda.driver as cuda

        cuda.init()
        self.device = device
        self._context = cuda.Device(device).retain_primary_context()
        self._context.push()
        try:
            self._load(cuda, build_dir, cuda_graphs, stage, verified, entry_device)
        finally:
            cuda.Context.pop()

    def _load(self, cuda, build_dir, cuda_graphs: bool, stage: int | None, verified: bool,
              entry_device: int | None) -> None:
        build = build_dir if isinstance(build_dir, BuildDir) else BuildDir(build_dir)
        if not verified:  # hashes, with clear messages; the engine is deserialized once, here
            verify(build.path, deserialize=False)
        manifest = build.manifest
        spec = manifest if stage is None else manifest["stages"][stage]  # this engine's io and profiles
        engine_file = build.engine if stage is None else build.stages[stage] / ENGINE_FILE
        engine_name = str(engine_file.relative_to(build.path))
        backend = manifest.get("backend") or {}
        trt = import_backend(backend.get("name", "auto"))  # the module that built it, never the automatic choice
        mismatch = version_mismatch(trt, backend)
        if mismatch:
            raise TrtglmError(mismatch, hint="rebuild the engine here")
        self._cuda, self._trt = cuda, trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise TrtglmError(f"{engine_file}: TensorRT could not load it on this GPU")
        _check_io(self.engine, spec, trt)
        self.profiles = _profiles(self.engine, trt)
        self._widths = [p["position_ids"][1][1] - p["position_ids"][0][1] for p in self.profiles]  # new tokens
        self._runtime_cache, self._runtime_cache_file = None, runtime_cache_file(manifest, engine_name)
        self.context = self._execution_context(cuda_graphs)
        self.stream = cuda.Stream()
        self.buffers = plan_buffers(spec)
        self.max_seq_len = int(manifest["max_seq_len"])
        self.max_batch = max(p["position_ids"][1][0] for p in self.profiles)
        self.max_input_len = max(p["position_ids"][1][1] for p in self.profiles)
        inputs = {s["name"] for s in spec["io"]["inputs"]}
        self.entry = [n for n in self.buffers if n in inputs and (n == "input_ids" or n.startswith("hidden."))]
        self.exit = [s["name"] for s in spec["io"]["outputs"] if not s["name"].startswith("present.")]
        self.vocab_size = self.buffers["logits"].max_shape[-1] if self.exit == ["logits"] else None
        self.past_names = [n for n in self.buffers if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.cache_tensors = len(self.past_names)
        self.static = CACHE_POSITION in self.buffers
        self._slots = self.buffers[self.past_names[0]].max_shape[2]  # static: the cache's fixed length
        # a stage's hidden-state input is read where the stage before left it (no buffer of its own), unless that
        # is another device
        here = entry_device is None or entry_device == self.device
        self._dev = {n: cuda.mem_alloc(b.nbytes) for n, b in self.buffers.items()
                     if not n.startswith(("past_key_values.", "present.")) and not (
                         here and n in inputs and n.startswith("hidden."))}
        self._sets = [[cuda.mem_alloc(self.buffers[n].nbytes) for n in self.present_names]
                      for _ in range(1 if self.static else 2)]
        if self.static:  # empty slots are masked, but 0 x NaN of uninitialized memory would still be NaN
            for buffer, name in zip(self._sets[0], self.present_names):
                cuda.memset_d8(buffer, 0, self.buffers[name].nbytes)
        self._logits = cuda.pagelocked_empty(math.prod(self.buffers["logits"].max_shape), np.float32) \
            if self.vocab_size else None
        self._elt = BY_NUMPY[self.buffers[self.past_names[0]].dtype].bytes
        # (heads, head_dim) of each cache tensor, in past_names' order: a layer's key and value may differ (MLA)
        self._dims = [(self.buffers[n].max_shape[1], self.buffers[n].max_shape[3]) for n in self.past_names]

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
            self._runtime_cache = config.create_runtime_cache()  # kept until the context is gone (close)
            f = self._runtime_cache_file
            if f.is_file() and not self._runtime_cache.deserialize(f.read_bytes()):
                LOG.warning("%s was written for another GPU, driver or TensorRT-RTX: compiling anew", f)
            config.set_runtime_cache(self._runtime_cache)
        context = engine.create_execution_context(config)
        if context is None:
            raise TrtglmError("TensorRT could not create an execution context for the engine")
        return context

    @contextlib.contextmanager
    def _on_device(self):
        """This engine's device current for what runs inside."""
        self._context.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def close(self) -> None:
        """Keep the kernels TensorRT-RTX compiled this session for the next one (written atomically), then release
        in dependency order: the context before the runtime cache it uses, both before the engine."""
        if self.context is None:
            return
        with self._on_device():
            self._close()

    def _close(self) -> None:
        self.stream.synchronize()
        if self._runtime_cache is not None:
            with atomic_file(self._runtime_cache_file) as tmp:
                tmp.write_bytes(bytes(self._runtime_cache.serialize()))
        self.context = None
        self._runtime_cache = None
        self.engine = None
        for allocation in [*self._dev.values(), *(a for s in self._sets for a in s)]:
            allocation.free()
        self._dev, self._sets = {}, []

    def admits(self, batch: int, tokens: int, past: int) -> str | None:
        """Why this engine cannot run a step of `batch` rows and `tokens` new tokens after `past` cached ones
        (None: a profile takes it)."""
        return self._step(batch, tokens, past)[0]

    def _step(self, batch: int, tokens: int, past: int) -> tuple[str | None, dict[str, tuple[int, ...]], int | None]:
        """(why the step cannot run or None, its input shapes, the profile it runs under)."""
        shapes = self._shapes(batch, tokens, past)
        return self._refusal(batch, tokens, past, shapes), shapes, self._profile_for(shapes)

    def _refusal(self, batch: int, tokens: int, past: int, shapes: dict[str, tuple[int, ...]]) -> str | None:
        if batch > self.max_batch:
            return f"{batch} rows exceed the engine's max_batch {self.max_batch} (trtglm build --max-batch)"
        if tokens > self.max_input_len:
            return (f"{tokens} new tokens exceed the engine's max_input_len {self.max_input_len} "
                    "(trtglm build --max-input-len)")
        if past + tokens > self.max_seq_len:
            return f"{past + tokens} tokens exceed the engine's max_seq_len {self.max_seq_len}"
        if self._profile_for(shapes) is None:
            return (f"no optimization profile of this engine takes {tokens} new tokens after {past} cached "
                    f"({_describe(self.profiles)})" + ("; split profiles have no prefill after a cached prefix: "
                                                      "build with shapes.profiles: single" if past and tokens > 1
                                                      else ""))
        return None

    def _shapes(self, batch: int, tokens: int, past: int) -> dict[str, tuple[int, ...]]:
        shapes = {name: (batch, tokens, *self.buffers[name].max_shape[2:]) for name in self.entry}
        shapes["position_ids"] = (batch, tokens)
        positions = self._positions(past)
        shapes["attention_mask"] = (batch, self._positions(past + tokens))
        if self.static:
            shapes[CACHE_POSITION] = (batch,)
        for name, (heads, d) in zip(self.past_names, self._dims):
            shapes[name] = (batch, heads, positions, d)
        return shapes

    def _profile_for(self, shapes: dict[str, tuple[int, ...]]) -> int | None:
        """The profile made for steps like this one: of those that admit its shapes, the one with the narrowest
        range of new tokens (split profiles: a decode step runs on the decode profile, built for it)."""
        admitting = [i for i, profile in enumerate(self.profiles)
                     if all(all(lo <= d <= hi for d, lo, hi in zip(shape, *profile[name]))
                            for name, shape in shapes.items())]
        return min(admitting, key=lambda i: (self._widths[i], i)) if admitting else None

    def new_cache(self, batch: int) -> TrtCache:
        return TrtCache(batch, 0, self._sets[0])

    def _positions(self, length: int) -> int:
        """Sequence positions a cache of `length` tokens spans: every slot of a static cache, else the length."""
        return self._slots if self.static else length

    def _other(self, buffers) -> list:
        """Where a step writes present: the other buffer set, or for a static cache the one set, in place."""
        return self._sets[1] if buffers is self._sets[0] and not self.static else self._sets[0]

    def forward(self, input_ids, attention_mask, position_ids, cache: TrtCache):
        """One step; `input_ids` is a later stage's hidden states (name -> DeviceTensor) instead. Returns the
        logits (host), or a stage's hidden states left on the device, and the cache."""
        with self._on_device():
            return self._forward(input_ids, attention_mask, position_ids, cache)

    def _forward(self, input_ids, attention_mask, position_ids, cache: TrtCache):
        cuda = self._cuda
        hidden = input_ids if isinstance(input_ids, dict) else {}
        b, s = next(iter(hidden.values())).shape[:2] if hidden else input_ids.shape
        reason, shapes, profile = self._step(b, s, cache.length)
        if reason:
            raise TrtglmError(f"the engine cannot run this step: {reason}")
        if profile != self.context.active_optimization_profile and \
                not self.context.set_optimization_profile_async(profile, self.stream.handle):
            raise TrtglmError(f"TensorRT refused optimization profile {profile}")
        feeds = {"attention_mask": attention_mask, "position_ids": position_ids} | (
            {} if hidden else {"input_ids": input_ids})
        if self.static:  # the mask covers every slot; the new tokens go to slot cache.length
            feeds |= step_inputs(attention_mask, cache.length, self._slots)
        hosts = {name: np.ascontiguousarray(array, dtype=np.int64) for name, array in feeds.items()}
        out = self._other(cache.buffers)
        addresses = {name: int(self._dev[name]) for name in [*hosts, *self.exit]}
        for name, tensor in hidden.items():  # where the stage before left them, or copied here from its device
            if tensor.device == self.device:
                addresses[name] = tensor.address
                continue
            nbytes = math.prod(tensor.shape) * np.dtype(self.buffers[name].dtype).itemsize
            cuda.memcpy_peer_async(self._dev[name], tensor.address, nbytes, self._context, tensor.context,
                                   self.stream)
            addresses[name] = int(self._dev[name])
        for i, (past, present) in enumerate(zip(self.past_names, self.present_names)):
            addresses[past], addresses[present] = int(cache.buffers[i]), int(out[i])
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise TrtglmError(f"TensorRT refused {name} of shape {shape} under optimization profile {profile}")
        for name, address in addresses.items():
            self.context.set_tensor_address(name, address)
        for name, host in hosts.items():
            cuda.memcpy_htod_async(self._dev[name], host, self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise TrtglmError(f"TensorRT failed to run the engine step (batch {b}, {s} new tokens after "
                              f"{cache.length} cached, profile {profile})")
        if self.vocab_size is None:  # a stage's hidden states, read by the next stage once this one is done
            self.stream.synchronize()
            return ({name: DeviceTensor(int(self._dev[name]), tuple(self.context.get_tensor_shape(name)), self.device,
                                        self._context) for name in self.exit}, TrtCache(b, cache.length + s, out))
        shape = tuple(self.context.get_tensor_shape("logits"))  # [b, s, V], or [b, 1, V] with `logits: last`
        n = math.prod(shape)
        cuda.memcpy_dtoh_async(self._logits[:n], self._dev["logits"], self.stream)
        self.stream.synchronize()
        return self._logits[:n].reshape(shape).copy(), TrtCache(b, cache.length + s, out)

    def expand_cache(self, cache: TrtCache, batch: int) -> TrtCache:
        """A batch-1 cache (a prefix) tiled to `batch` rows in a working buffer set."""
        with self._on_device():
            return self._expand_cache(cache, batch)

    def _expand_cache(self, cache: TrtCache, batch: int) -> TrtCache:
        cuda = self._cuda
        out = self._other(cache.buffers)
        for src, dst, (heads, d) in zip(cache.buffers, out, self._dims):
            row = heads * self._positions(cache.length) * d * self._elt
            for r in range(batch):
                cuda.memcpy_dtod_async(int(dst) + r * row, src, row, self.stream)
        self.stream.synchronize()
        return TrtCache(batch, cache.length, out)

    def read_cache(self, cache: TrtCache) -> list[np.ndarray]:
        """The cache's filled positions copied to the host: one array [B, heads, filled, D] per cache tensor."""
        with self._on_device():
            arrays = []
            for buffer, name, (heads, d) in zip(cache.buffers, self.present_names, self._dims):
                host = np.empty((cache.batch, heads, self._positions(cache.length), d), self.buffers[name].dtype)
                self._cuda.memcpy_dtoh_async(host, buffer, self.stream)
                arrays.append(host)
            self.stream.synchronize()
            return [a[:, :, :cache.length] for a in arrays]

    def write_cache(self, arrays: list[np.ndarray]) -> TrtCache:
        """A cache holding `arrays` (as `read_cache` gives them) in the first buffer set: rows of a running
        batch rearranged."""
        batch, length = arrays[0].shape[0], arrays[0].shape[2]
        reason = self.admits(batch, 1, length)
        if reason:
            raise TrtglmError(f"the engine cannot hold this batch: {reason}")
        with self._on_device():
            hosts = []  # alive until the copies are done
            for buffer, name, array, (heads, d) in zip(self._sets[0], self.present_names, arrays, self._dims):
                hosts.append(np.zeros((batch, heads, self._positions(length), d), self.buffers[name].dtype))
                hosts[-1][:, :, :length] = array
                self._cuda.memcpy_htod_async(buffer, hosts[-1], self.stream)
            self.stream.synchronize()
        return TrtCache(batch, length, self._sets[0])

    def snapshot(self, cache: TrtCache) -> TrtCache:
        """A copy in its own device memory, so later steps cannot overwrite it (prefix reuse)."""
        with self._on_device():
            return self._snapshot(cache)

    def _snapshot(self, cache: TrtCache) -> TrtCache:
        cuda = self._cuda
        copies = []
        for src, (heads, d) in zip(cache.buffers, self._dims):
            size = cache.batch * heads * self._positions(cache.length) * d * self._elt
            dst = cuda.mem_alloc(max(size, 1))
            cuda.memcpy_dtod_async(dst, src, size, self.stream)
            copies.append(dst)
        self.stream.synchronize()
        return TrtCache(cache.batch, cache.length, copies)


def _profiles(engine, trt) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
    """Each optimization profile of the engine: input -> (min shape, max shape)."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    out = []
    for index in range(engine.num_optimization_profiles):
        profile = {}
        for name in inputs:
            low, _, high = engine.get_tensor_profile_shape(name, index)
            profile[name] = (tuple(low), tuple(high))
        out.append(profile)
    return out


def _describe(profiles: list[dict]) -> str:
    parts = []
    for i, p in enumerate(profiles):
        (_, s_lo), (_, s_hi) = p["position_ids"]
        parts.append(f"profile {i}: {s_lo}-{s_hi} new tokens")
    return "; ".join(parts)


def open_engines(build: BuildDir, cuda_graphs: bool = False, devices: list[int] | None = None):
    """The build's engine, or a staged build's engines chained (hashes checked once for all of them), on
    `devices` (default: device 0): a staged build's consecutive stages per device, the largest device's share of
    the engines as small as it can be."""
    devices = check_devices(devices or [0])
    if not build.stages:
        if len(devices) > 1:
            raise UsageError(f"--devices {','.join(map(str, devices))}: this build is one engine, which runs on "
                             "one device", hint="build in stages (trtglm build --max-memory) to run on several")
        return TrtBackend(build, cuda_graphs=cuda_graphs, device=devices[0])
    from .staged import StagedBackend, place_stages

    verify(build.path, deserialize=False)
    placed = place_stages([s["engine"]["bytes"] for s in build.manifest["stages"]], devices)
    return StagedBackend([TrtBackend(build, cuda_graphs=cuda_graphs, stage=i, verified=True, device=placed[i],
                                     entry_device=placed[i - 1] if i else None) for i in range(len(placed))])


def check_devices(devices: list[int]) -> list[int]:
    """`devices` if each is a CUDA device here, once; else one line naming the problem."""
    import pycuda.driver as cuda

    cuda.init()
    count = cuda.Device.count()
    if len(set(devices)) != len(devices):
        raise UsageError(f"--devices {','.join(map(str, devices))} names a device twice")
    missing = [d for d in devices if not 0 <= d < count]
    if missing:
        have = "none" if count == 0 else "0" if count == 1 else f"0-{count - 1}"
        raise UsageError(f"--devices: no CUDA device {', '.join(map(str, missing))} here (devices here: {have})")
    return devices


def _check_io(engine, manifest: dict, trt) -> None:
    """The engine's IO tensors (names, directions, dtypes) against the manifest's: a build directory whose
    engine is not the one its manifest describes is refused at load."""
    io = manifest.get("io") or {}
    want = {s["name"]: ("input", s["dtype"]) for s in io.get("inputs", [])}
    want |= {s["name"]: ("output", s["dtype"]) for s in io.get("outputs", [])}
    have = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        have[name] = (mode, np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name)
    problems = [f"{n}: the manifest says {want[n][0]} {want[n][1]}, the engine {have[n][0]} {have[n][1]}"
                for n in sorted(set(want) & set(have)) if want[n] != have[n]]
    problems += [f"{n} is in the manifest, not in the engine" for n in sorted(set(want) - set(have))]
    problems += [f"{n} is in the engine, not in the manifest" for n in sorted(set(have) - set(want))]
    if problems:
        raise TrtglmError("the engine does not match its manifest: " + "; ".join(problems),
                          hint="rebuild the build directory (trtglm build --force)")
