"""Model backends behind one interface: ONNX Runtime over BUILD_DIR/model.onnx, or the TensorRT engine.

    forward(input_ids [B,S], attention_mask [B,P+S], position_ids [B,S], cache) -> (logits [B,S,V] fp32, cache)

The cache is the backend's own (ONNX Runtime values, or device buffers), never copied to numpy
between steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..core.errors import TrtglmError, UsageError
from ..core.memory import available_memory
from ..engine.directory import ONNX_FILE, BuildDir
from ..engine.static_cache import CACHE_POSITION, step_inputs
from ..engine.tensorrt import gpu_compute_capability
from .cache_window import window
from .integer_gemm import NO_QDQ_FUSION, lower, select_form
from .moe_op import lower_moe
from .trt import open_engines, unavailable_reason
from .staged import StagedBackend


class Backend(Protocol):
    name: str
    int8_gemm: str | None  # ONNX Runtime on the CPU: the integer GEMM form of int8 MatMuls, and why
    max_seq_len: int
    vocab_size: int

    def new_cache(self, batch: int): ...

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache): ...

    def expand_cache(self, cache, batch: int): ...

    def snapshot(self, cache): ...  # the cache where later steps cannot overwrite it (prefix reuse)

    def read_cache(self, cache) -> list[np.ndarray]: ...  # host copies [B, heads, filled, D], one per cache tensor

    def write_cache(self, arrays: list[np.ndarray]): ...  # a cache of the backend's own holding such arrays

    def admits(self, batch: int, tokens: int, past: int) -> str | None: ...  # why a step cannot run (None: it can)

    def close(self) -> None: ...


@dataclass
class StaticCache:
    values: list  # OrtValues [B, KV, slots, D], written in place
    length: int  # slots filled


class OrtBackend:
    """A decoder graph in ONNX Runtime (CPU, or CUDA where onnxruntime-gpu finds a GPU).

    The cache layout is read from the session's own inputs, so any trtglm graph runs: an export,
    a build, or a test's. `low_memory` drops ONNX Runtime's arena (fp16 weights cast to fp32 per op
    are then freed at once); `optimize=False` turns its graph optimizations off; `profile=PREFIX` records
    ONNX Runtime's profile to PREFIX_<time>.json (`session.end_profiling()` returns the path).
    `cuda_graphs=True` (CUDA provider, static cache): each batch size's decode step is captured once as a CUDA
    graph and replayed after (one launch instead of one per node); its inputs, logits and KV cache then live
    in device buffers kept per batch size, since a replay reads and writes the addresses it was captured with.
    `int8_gemm` forces an integer GEMM form on the CPU (integer_gemm.FORMS; default: the one exact on this CPU);
    `self.int8_gemm` says which runs, and why. `spin=False`: its threads sleep between steps instead of spinning.
    """

    name = "ort"

    def __init__(self, onnx_path: str | Path, *, max_seq_len: int | None = None, threads: int = 0,
                 device: str = "auto", optimize: bool = True, low_memory: bool = False, profile: str | Path | None = None,
                 cuda_graphs: bool = False, int8_gemm: str | None = None, moe_op: bool = True, spin: bool = True):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(profile)
        if low_memory:
            opts.enable_cpu_mem_arena = False
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        providers: list = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and _cuda_usable(ort):
            # fp32 means fp32: the CUDA provider's default TF32 matmuls move an fp32 graph's logits far past the
            # export's own tolerance against transformers
            options = {"use_tf32": "0"} | ({"enable_cuda_graph": "1"} if cuda_graphs else {})
            providers.insert(0, ("CUDAExecutionProvider", options))
        elif device == "cuda":
            raise TrtglmError("--device cuda: ONNX Runtime has no usable CUDA provider here")
        if cuda_graphs and len(providers) == 1:
            raise TrtglmError("--cuda-graphs on ONNX Runtime needs its CUDA provider (onnxruntime-gpu and a GPU); "
                              "here it runs on the CPU")
        import onnx_ir as ir

        graph = ir.load(onnx_path)  # the weights stay in the data file
        # a replayed step keeps the shapes it was captured with: no attention window that grows with the cache
        model, self.int8_gemm, self.moe_blocks = _session_graph(
            graph, Path(onnx_path), opts, cpu=len(providers) == 1, window_cache=not cuda_graphs, int8_gemm=int8_gemm,
            moe_op=moe_op)
        self.session = ort.InferenceSession(model, opts, providers=providers)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        inputs = self.session.get_inputs()
        self.past = [i for i in inputs if i.name.startswith("past_key_values.")]
        self.present = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        self.cache_tensors = len(self.past)
        # a stage of a staged build (engine/stage_graphs.py) reads and writes hidden states instead
        self.entry = [i.name for i in inputs if i.name == "input_ids" or i.name.startswith("hidden.")]
        self.exit = [o.name for o in self.session.get_outputs() if not o.name.startswith("present.")]
        self.vocab_size = self.session.get_outputs()[0].shape[-1] if self.exit == ["logits"] else None
        self._hidden, self._widest = _activation_widths(graph, self.vocab_size or -1)
        self.max_seq_len = max_seq_len or 1 << 30
        # a static cache (static_cache.py): fixed slots, updated in place, the write position as an input
        self.static = any(i.name == CACHE_POSITION for i in inputs)
        self._slots = self.past[0].shape[2] if self.static else 0  # positions a new cache holds
        if self.static:
            self.max_seq_len = min(self.max_seq_len, self._slots)
        self._dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(self.past[0].type)
        if self._dtype is None:
            raise TrtglmError(f"ONNX Runtime cannot run a {self.past[0].type} KV cache on this machine")
        if cuda_graphs and not self.static:
            raise UsageError("--cuda-graphs needs a build with a static KV cache (trtglm build --kv-cache static)")
        self._ort = ort
        self._graphs = cuda_graphs
        self._kept: dict[int, dict[str, object]] = {}  # batch -> device buffers of its captured decode step
        self._uncaptured = None  # run options of the steps that run as they are (all, without CUDA graphs)
        if cuda_graphs:  # a prefill's length varies: run it, never capture it
            self._uncaptured = self._run_options("-1")

    @classmethod
    def from_build(cls, build: "BuildDir | str | Path", threads: int = 0, **options):
        """The build's graph; a staged build's stage graphs chained (runtime/staged.py)."""
        build = build if isinstance(build, BuildDir) else BuildDir(build)
        if build.packed == "gpu":
            raise TrtglmError(f"{build.path} is packed for GPUs (trtglm pack --for gpu): it holds the engines only, "
                              "and ONNX Runtime runs the graphs", hint="run the full build or its pack --for cpu")
        if build.stages:
            if options.get("cuda_graphs"):
                raise UsageError("--cuda-graphs on ONNX Runtime runs a build of one graph; this build is in "
                                 f"{len(build.stages)} stages")
            return StagedBackend([cls(d / ONNX_FILE, max_seq_len=build.max_seq_len, threads=threads, **options)
                                  for d in build.stages])
        return cls(build.onnx, max_seq_len=build.max_seq_len, threads=threads, **options)

    def _on_device(self, array: np.ndarray):
        """An OrtValue where the session computes (the CUDA provider's memory, or the CPU): a cache bound there
        is read and, when static, written in place, with no copy to or from the host at any step."""
        return self._ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def new_cache(self, batch: int):
        empty = [np.zeros((batch, p.shape[1], self._slots, p.shape[3]), self._dtype) for p in self.past]
        return self._cache_of(batch, empty, 0)

    def close(self) -> None:
        pass

    def admits(self, batch: int, tokens: int, past: int) -> str | None:
        """ONNX Runtime runs any shape, as far as memory goes: a step that cannot fit in the memory available is
        refused with the size it would need (the sequence limit is generate's)."""
        need, available = self.step_bytes(batch, tokens, past), available_memory()
        if available is not None and need > available:
            return (f"{batch} rows of {past + tokens} tokens need about {need / 2**30:.1f} GiB for the KV cache, "
                    f"logits and activations, and {available / 2**30:.1f} GiB is available")
        return None

    def step_bytes(self, batch: int, tokens: int, past: int) -> int:
        """An estimate of the memory a step takes beyond the weights: its KV cache (past and present), logits,
        and one layer's activations in fp32 (the widest projections; attention scores with their softmax)."""
        positions = self._slots if self.static else past + tokens
        element = np.dtype(self._dtype).itemsize
        cache = sum(batch * p.shape[1] * positions * p.shape[3] * element for p in self.past)
        logits = batch * tokens * (self.vocab_size or 0) * 4
        heads = max(1, self._hidden // self.past[0].shape[3])
        activations = batch * tokens * 4 * (12 * self._hidden + 3 * self._widest + 3 * heads * (past + tokens))
        return cache * (1 if self.static else 2) + logits + activations

    def expand_cache(self, cache, batch: int):
        """`cache` (batch 1, a prefix) copied into `batch` rows: later steps write the copy, never `cache`."""
        values = cache.values if self.static else cache
        tiled = [np.repeat(v.numpy(), batch, axis=0) for v in values]  # once per request
        return self._cache_of(batch, tiled, cache.length if self.static else 0)

    def snapshot(self, cache):
        """A prefix's cache in values of its own: with CUDA graphs, `cache` is the batch's kept buffers."""
        if not self._graphs:
            return cache
        return StaticCache([self._on_device(v.numpy()) for v in cache.values], cache.length)

    def read_cache(self, cache) -> list[np.ndarray]:
        """The cache's filled positions copied to the host: one array [B, heads, filled, D] per cache tensor."""
        values = cache.values if self.static else cache
        return [np.array(v.numpy()[:, :, :cache.length] if self.static else v.numpy()) for v in values]

    def write_cache(self, arrays: list[np.ndarray]):
        """A new cache holding `arrays` (as `read_cache` gives them): rows of a running batch rearranged."""
        batch, length = arrays[0].shape[0], arrays[0].shape[2]
        if self.static:
            if length > self._slots:
                raise TrtglmError(f"{length} tokens do not fit the static KV cache's {self._slots} slots")
            full = [np.zeros((batch, p.shape[1], self._slots, p.shape[3]), self._dtype) for p in self.past]
            for slots, array in zip(full, arrays):
                slots[:, :, :length] = array
            arrays = full
        return self._cache_of(batch, [np.ascontiguousarray(a, self._dtype) for a in arrays], length)

    def _cache_of(self, batch: int, arrays: list[np.ndarray], length: int):
        if not self._graphs:
            values = [self._on_device(a) for a in arrays]
            return StaticCache(values, length) if self.static else values
        values = self._kept_buffers(batch)["cache"]
        for value, array in zip(values, arrays):
            value.update_inplace(array)
        return StaticCache(values, length)

    def _kept_buffers(self, batch: int) -> dict:
        """The device buffers of one batch size's captured decode step: its cache, its inputs, its logits."""
        if batch not in self._kept:
            new = self._ort.OrtValue.ortvalue_from_shape_and_type
            self._kept[batch] = {
                "cache": [new((batch, p.shape[1], self._slots, p.shape[3]), self._dtype, "cuda", 0) for p in self.past],
                "inputs": {name: new(shape, np.int64, "cuda", 0) for name, shape in (
                    ("input_ids", (batch, 1)), ("position_ids", (batch, 1)), ("attention_mask", (batch, self._slots)),
                    (CACHE_POSITION, (batch,)))},
                "logits": new((batch, 1, self.vocab_size), np.float32, "cuda", 0),
                "options": self._run_options(str(batch))}  # one graph per batch size (ids from 1)
        return self._kept[batch]

    def _run_options(self, graph_id: str):
        options = self._ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", graph_id)
        return options

    def _replayed_decode(self, input_ids, attention_mask, position_ids, cache: "StaticCache"):
        """One decode step through the batch size's CUDA graph (captured on its first run, replayed after)."""
        batch = input_ids.shape[0]
        kept = self._kept_buffers(batch)
        if cache.values is not kept["cache"]:
            raise TrtglmError("internal: a captured decode step got a cache it was not captured with")
        arrays = {"input_ids": input_ids, "position_ids": position_ids,
                  **step_inputs(attention_mask, cache.length, self._slots)}
        binding = self.session.io_binding()
        for name, value in kept["inputs"].items():
            value.update_inplace(np.ascontiguousarray(arrays[name], dtype=np.int64))
            binding.bind_ortvalue_input(name, value)
        for spec, name, value in zip(self.past, self.present, cache.values):
            binding.bind_ortvalue_input(spec.name, value)
            binding.bind_ortvalue_output(name, value)
        binding.bind_ortvalue_output("logits", kept["logits"])
        self.session.run_with_iobinding(binding, kept["options"])
        return kept["logits"].numpy(), StaticCache(cache.values, cache.length + 1)

    def forward(self, input_ids, attention_mask, position_ids, cache):
        if self._graphs and input_ids.shape[1] == 1:
            return self._replayed_decode(input_ids, attention_mask, position_ids, cache)
        binding = self.session.io_binding()
        if isinstance(input_ids, dict):  # a later stage: the hidden states the stage before left on the device
            for name, value in input_ids.items():
                binding.bind_ortvalue_input(name, value)
            tokens = next(iter(input_ids.values())).shape()[1]
        else:
            binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
            tokens = input_ids.shape[1]
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        values = cache.values if self.static else cache
        for spec, value in zip(self.past, values):
            binding.bind_ortvalue_input(spec.name, value)
        for name in self.exit:
            binding.bind_output(name, "cpu" if name == "logits" else self.device)
        if self.static:  # the mask over every slot, the write position, and present written over past in place
            for name, array in step_inputs(attention_mask, cache.length, self._slots).items():
                binding.bind_cpu_input(name, array)
            for name, value in zip(self.present, values):
                binding.bind_ortvalue_output(name, value)
        else:  # ORT allocates; presents stay OrtValues for the next step
            binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
            for name in self.present:
                binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding, self._uncaptured)
        outputs = binding.get_outputs()
        exits, presents = outputs[:len(self.exit)], outputs[len(self.exit):]
        result = exits[0].numpy() if self.exit == ["logits"] else dict(zip(self.exit, exits))
        if self.static:
            return result, StaticCache(values, cache.length + tokens)
        return result, presents


def _activation_widths(model, vocab) -> tuple[int, int]:
    """The hidden size (the embedding table's width) and the widest weight dimension other than the vocabulary
    of a decoder graph, from its initializers' shapes (no weight is read)."""
    shapes = [tuple(v.shape) for v in model.graph.initializers.values() if v.shape is not None and len(v.shape) == 2
              and all(isinstance(d, int) for d in v.shape)]
    dims = [d for shape in shapes for d in shape if d != vocab]
    if not dims:
        return 1, 1
    embedding = [shape[1] for shape in shapes if shape[0] == vocab]
    hidden = int(embedding[0]) if embedding else min(dims)
    return hidden, max(dims)


def _session_graph(model, onnx_path: Path, opts, cpu: bool, window_cache: bool = True,
                   int8_gemm: str | None = None, moe_op: bool = True) -> tuple[str | bytes, str | None, int]:
    """What ONNX Runtime runs of `onnx_path`, rewritten in memory (the build's model.onnx is TensorRT's graph and
    stays as it is), and the integer GEMM form of its int8 MatMuls with why (None: it has none). A static
    cache's attention reads only the filled slots (cache_window.py). On the CPU, W8A8 graphs (int8/fp8 Q/DQ,
    fp16 around) have no GEMM: it would dequantize every weight at every step. Their int8 MatMuls become
    integer GEMMs in the form exact on this CPU (integer_gemm.py: 1 byte per weight read); the weight DQs of
    the others (fp8) are folded at load, the same values computed once into fp32. Mixture-of-experts blocks run
    as ONNX Runtime's MoE op (moe_op.py; `moe_op=False` keeps the graph's gathered form); the third value is how
    many."""
    import onnx_ir as ir

    changed = window(model) if window_cache else 0
    moe_blocks = lower_moe(model) if moe_op and cpu else 0  # the CUDA provider's MoE kernel is not checked yet
    changed += moe_blocks
    form = None
    if cpu and any(node.op_type == "QuantizeLinear" for node in model.graph):
        opts.add_session_config_entry(*NO_QDQ_FUSION)
        chosen, why = select_form()
        chosen = int8_gemm or chosen
        lowered = lower(model, chosen)
        changed += lowered
        if lowered or chosen == "dequantize":
            form = f"{chosen}" + (f" ({why})" if not int8_gemm else " (forced)")
    if not changed:
        return str(onnx_path), form, moe_blocks
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(onnx_path.parent))
    return ir.to_proto(model).SerializeToString(), form, moe_blocks


def _ort_line(backend: OrtBackend, graphs: str) -> str:
    gemm = f", int8 GEMMs {backend.int8_gemm}" if backend.int8_gemm else ""
    return f"{backend.device}{graphs}{gemm}"


def _graphs(build: BuildDir) -> str:
    return f"the graphs of its {len(build.stages)} stages" if build.stages else "model.onnx"


def _static_cache(manifest: dict) -> bool:
    return any(spec["name"] == CACHE_POSITION for spec in (manifest.get("io") or {}).get("inputs", []))


def _cuda_usable(ort) -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False

    return gpu_compute_capability() is not None


def _placement(engines) -> str:
    """` on devices 0,0,1` (each stage's) where a staged build's stages run on more than one device."""
    placed = [s.device for s in engines.stages]
    return f" on devices {','.join(map(str, placed))}" if len(set(placed)) > 1 else ""


def open_backend(build_dir: str | Path, kind: str = "auto", threads: int = 0,
                 cuda_graphs: bool = False, devices: list[int] | None = None,
                 spin: bool = True) -> tuple[Backend, str]:
    """The backend and a sentence saying which and why (auto: the engine when a GPU and TensorRT are there).
    `cuda_graphs`: decode steps captured as CUDA graphs, by TensorRT-RTX on the engine or by ONNX Runtime's CUDA
    provider; both need a static KV cache. `devices`: the CUDA devices the engines run on (a staged build's
    stages spread over them). `spin=False`: ONNX Runtime's threads sleep between steps instead of spinning (a
    server's own threads need the cores then)."""
    build = BuildDir(build_dir)  # its manifest is read once, here, for every backend
    if devices and kind == "ort":
        raise UsageError("--devices places TensorRT engines; --backend ort runs ONNX Runtime on one device")
    if cuda_graphs and not _static_cache(build.manifest):
        raise UsageError("--cuda-graphs needs a build with a static KV cache (trtglm build --kv-cache static): a "
                         "dynamic cache changes shape at every step, so no captured step would recur")
    graphs = ", CUDA graphs" if cuda_graphs else ""
    if kind in ("auto", "trt"):
        reason = unavailable_reason(build)
        if reason is None:
            engines = open_engines(build, cuda_graphs=cuda_graphs, devices=devices)
            stages = f" ({len(build.stages)} stages{_placement(engines)})" if build.stages else ""
            return engines, f"TensorRT engine{stages}{graphs}"
        if kind == "trt":
            raise TrtglmError(f"--backend trt: {reason}")
        try:
            backend = OrtBackend.from_build(build, threads=threads, cuda_graphs=cuda_graphs, spin=spin)
        except TrtglmError as e:
            raise TrtglmError(f"{e} (and the TensorRT engine cannot run here: {reason})") from None
        return backend, f"ONNX Runtime ({_ort_line(backend, graphs)}) over {_graphs(build)}, because {reason}"
    if kind == "ort":
        backend = OrtBackend.from_build(build, threads=threads, cuda_graphs=cuda_graphs, spin=spin)
        return backend, f"ONNX Runtime ({_ort_line(backend, graphs)}) over {_graphs(build)}"
    raise TrtglmError(f"unknown backend {kind!r}: auto, trt or ort")
