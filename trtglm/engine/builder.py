"""Build a TensorRT engine from an ONNX decoder: one code path for `tensorrt` and `tensorrt_rtx`.

    model.onnx ─ OnnxParser ─> network ─ hooks ─ profiles (prefill: past 0; decode: seq 1) ─> serialized engine
                                                                                              + per-layer kernel list

TensorRT-RTX builds on a CPU for explicit compute-capability targets; the per-layer list comes
from the `Layers:` message of a DETAILED-verbosity build (the engine inspector needs a GPU).
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..core.errors import TrtglmError
from ..core.files import atomic_file
from ..core.recipe import BuilderSection, ShapesSection
from .static_cache import CACHE_POSITION
from .tensorrt import check_targets, import_backend

# Engine layers that launch no GPU kernel of their own.
NOT_KERNELS = {"shape_call", "ShapeHostToDevice", "NoOp", "Reformat", "signal", "wait"}  # signal/wait: stream events
INT32_MAX = 2**31 - 1
_LOGGER = None  # one logger for the whole process: TensorRT-RTX segfaults when loggers are freed and re-made


class BuildError(TrtglmError):
    def __init__(self, message: str, errors: list[str] | None = None):
        self.errors = errors or []
        detail = "".join(f"\n  {e}" for e in self.errors)  # every error, one per line under the summary
        super().__init__(message + (f" ({len(self.errors)} error(s)):{detail}" if detail else ""))


class BuildCancelled(TrtglmError):
    exit_code = 130


@dataclass
class Plan:
    """Optimization profiles and the memory they imply, checked before building."""

    profiles: list[dict[str, list[tuple[int, ...]]]]
    kv_cache_bytes: int
    activation_bytes: int


def plan_shapes(io: dict, config: dict, shapes: ShapesSection, kv_bytes: int) -> Plan:
    """Optimization profiles covering prefill (past 0, up to max_input_len tokens) and decode (1 token, past up
    to max_seq_len-1).

    TensorRT checks that total = past + seq holds at each profile's min, opt and max. `single` (default) is one
    profile whose max corner is (max_input_len, max_seq_len-1, their sum); `split` is one profile per phase.
    Measured with TensorRT-RTX 1.7: split compiles one Myelin graph per profile, each with its own copy of the
    weights (engine and build memory double); its decode kernels read the KV heads unrepeated, one kernel per
    layer fewer than one profile with a static cache, one more with the dynamic cache (bench/fusion.py).
    """
    b, inp, seq = shapes.max_batch, shapes.max_input_len, shapes.max_seq_len
    if not 0 < inp <= seq:
        raise TrtglmError(f"impossible shapes: max_input_len {inp} must be between 1 and max_seq_len {seq}")
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    cache = cache_dims(io, config)
    widest = max(heads * d for heads, d in cache.values())
    rows = inp if shapes.logits == "all" else 1  # positions of logits per sequence
    for what, elements in (("logits [batch, input, vocab]", b * rows * vocab),
                           ("attention scores [batch, heads, input, total]", b * config["num_heads"] * inp * seq),
                           ("KV cache [batch, kv_heads, total, head_dim]", b * widest * seq)):
        if elements > INT32_MAX:
            raise TrtglmError(f"impossible shapes: {what} has {elements:,} elements, over TensorRT's int32 limit; "
                              "lower max_batch or max_input_len")
    profiles = make_profiles([spec["name"] for spec in io["inputs"]], cache, shapes)
    kv_cache = sum(b * heads * seq * d * kv_bytes for heads, d in cache.values())
    activations = b * (rows * vocab * 4 + inp * (4 * hidden * kv_bytes + config["num_heads"] * seq * kv_bytes))
    return Plan(profiles, kv_cache, activations)


def cache_dims(io: dict, config: dict) -> dict[str, tuple[int, int]]:
    """(heads, head_dim) of each cache input [batch, heads, past, head_dim]: from the IO spec, or where that does not
    say (a stage's IO), the config's KV heads and head_dim (MLA: its latent and rotary key)."""
    out = {}
    for spec in io["inputs"]:
        if not spec["name"].startswith("past_key_values."):
            continue
        shape = spec.get("shape") or []
        if len(shape) == 4 and isinstance(shape[1], int) and isinstance(shape[3], int):
            out[spec["name"]] = (shape[1], shape[3])
        elif config.get("mla"):
            mla = config["mla"]
            out[spec["name"]] = (1, mla["kv_lora_rank"] if spec["name"].endswith(".key") else mla["qk_rope_head_dim"])
        else:
            out[spec["name"]] = (config["num_kv_heads"], config["head_dim"])
    return out


def make_profiles(input_names: list[str], cache: dict[str, tuple[int, int]], shapes: ShapesSection) -> list[dict]:
    """min/opt/max shapes of every decoder input for each profile (see plan_shapes for single vs split). A static
    cache (an input `cache_position`, static_cache.py) has max_seq_len slots in every profile."""
    b, inp, seq = shapes.max_batch, shapes.max_input_len, shapes.max_seq_len
    static = CACHE_POSITION in input_names
    ob = shapes.opt_batch or 1
    oi = shapes.opt_input_len or max(1, inp // 2)
    if shapes.profiles == "split":
        ranges = [((1, oi, inp), (0, 0, 0)), ((1, 1, 1), (0, seq // 2, seq - 1))]
    else:  # opt at decode: the step that runs most often
        ranges = [((1, 1, inp), (0, seq // 2, seq - 1))]
    profiles = []
    for (s_min, s_opt, s_max), (p_min, p_opt, p_max) in ranges:
        profile = {}
        for name in input_names:
            if name in ("input_ids", "position_ids"):
                profile[name] = [(1, s_min), (ob, s_opt), (b, s_max)]
            elif name == CACHE_POSITION:
                profile[name] = [(1,), (ob,), (b,)]
            elif static:  # attention_mask [B, slots], past [B, KV, slots, D]
                rest = (seq,) if name == "attention_mask" else (cache[name][0], seq, cache[name][1])
                profile[name] = [(1, *rest), (ob, *rest), (b, *rest)]
            elif name == "attention_mask":
                profile[name] = [(1, s_min + p_min), (ob, s_opt + p_opt), (b, s_max + p_max)]
            else:
                heads, d = cache[name]
                profile[name] = [(1, heads, p_min, d), (ob, heads, p_opt, d), (b, heads, p_max, d)]
        profiles.append(profile)
    return profiles


@dataclass
class Engine:
    plan: bytes | None  # None: written to the file build_engine was given
    backend: str
    version: str
    seconds: float
    network_layers: int
    layers: list[dict] = field(default_factory=list)  # {"name", "type"} per engine layer, from the build log
    network_layer_types: dict[str, int] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    @property
    def kernels(self) -> list[dict]:
        return [layer for layer in self.layers if layer["type"] not in NOT_KERNELS]


def _logger(trt):
    global _LOGGER
    if _LOGGER is None:
        class Collect(trt.ILogger):
            def __init__(self):
                super().__init__()
                self.messages: list[tuple[object, str]] = []

            def log(self, severity, msg):
                self.messages.append((severity, msg))

        _LOGGER = Collect()
        _LOGGER.min_severity = trt.ILogger.Severity.VERBOSE
    return _LOGGER


def _monitor(trt, on_step: Callable[[str, int, int], None] | None, cancelled: threading.Event):
    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            super().__init__()
            self.phases: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.phases[phase_name] = num_steps

        def step_complete(self, phase_name, step):
            if on_step:
                on_step(phase_name, step, self.phases.get(phase_name, 0))
            return not cancelled.is_set()  # False cancels the build

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def build_engine(onnx_path: str | Path, *, profiles: list[dict] | None = None, builder: BuilderSection | None = None,
                 dtype: str = "fp16", on_step: Callable[[str, int, int], None] | None = None,
                 targets: tuple[str, ...] | None = None, max_batch: int = 1, max_input_len: int = 128,
                 max_seq_len: int = 256, timing_cache: Path | None = None, write_to: Path | None = None) -> Engine:
    """Parse, apply the post-parse hooks, configure from `builder`, build. Ctrl-C cancels cleanly. With
    `write_to`, the engine is serialized straight into that file (atomically; no copy of it in memory)."""
    builder_cfg = builder or BuilderSection(targets=targets or ("sm89",))
    trt = import_backend(builder_cfg.backend)
    check_targets(builder_cfg.targets, dtype, trt.__name__)
    log = _logger(trt)
    log.messages.clear()
    b = trt.Builder(log)
    network = b.create_network(0)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        raise BuildError(f"{onnx_path}: the ONNX parser refused the graph",
                         [str(parser.get_error(i)) for i in range(parser.num_errors)])
    _hooks(trt, network, dtype)
    config = _configure(trt, b, builder_cfg, timing_cache)
    if profiles is None:
        profiles = _default_profiles(network, max_batch, max_input_len, max_seq_len)
    for profile in profiles:
        p = b.create_optimization_profile()
        for name, shapes in profile.items():
            p.set_shape(name, *shapes)
        config.add_optimization_profile(p)
    cancelled = threading.Event()
    config.progress_monitor = _monitor(trt, on_step, cancelled)
    started = time.perf_counter()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda *_: cancelled.set())
    try:
        if write_to is None:
            plan = b.build_serialized_network(network, config)
        else:
            plan = _build_to_file(trt, b, network, config, Path(write_to))
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    seconds = time.perf_counter() - started
    if cancelled.is_set():
        if write_to is not None:
            Path(write_to).unlink(missing_ok=True)
        raise BuildCancelled("build cancelled (Ctrl-C); nothing was written")
    messages = [m for _, m in log.messages]
    if plan is None:
        errors = [m for s, m in log.messages if s in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR)]
        raise BuildError("TensorRT could not build the engine", [e.splitlines()[0][:300] for e in errors])
    if timing_cache is not None and builder_cfg.timing_cache and trt.__name__ != "tensorrt_rtx":
        _save_timing_cache(config, timing_cache)
    types = Counter(str(network.get_layer(i).type).split(".")[-1] for i in range(network.num_layers))
    return Engine(None if write_to is not None else bytes(plan), trt.__name__, trt.__version__, seconds,
                  network.num_layers, _engine_layers(log.messages), dict(types), messages)


def _build_to_file(trt, b, network, config, path: Path) -> bool | None:
    """The engine serialized into `path` as TensorRT writes it: True, or None where the build failed (nothing is
    left at `path` then)."""

    class Writer(trt.IStreamWriter):
        def __init__(self, f):
            trt.IStreamWriter.__init__(self)
            self.f = f

        def write(self, data) -> int:
            return self.f.write(memoryview(data))

    class Failed(Exception):
        pass

    try:
        with atomic_file(path) as tmp:
            with open(tmp, "wb") as f:
                if not b.build_serialized_network_to_stream(network, config, Writer(f)):
                    raise Failed
    except Failed:
        return None
    return True


def _hooks(trt, network, dtype: str) -> None:
    """Where the parser's defaults are wrong for an LLM decoder."""
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.ATTENTION_OUTPUT and dtype == "fp32":
            # No fused fp32 attention kernel exists; without this the fp32 build fails.
            layer.__class__ = trt.IAttentionOutputLayer  # get_layer returns the base class
            layer.attention.decomposable = True


def _configure(trt, b, s: BuilderSection, timing_cache: Path | None):
    config = b.create_builder_config()
    config.profiling_verbosity = getattr(trt.ProfilingVerbosity, s.profiling_verbosity.upper())
    config.builder_optimization_level = s.optimization_level
    if s.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_mb << 20)
    if s.tactic_shared_memory_kb:
        config.set_memory_pool_limit(trt.MemoryPoolType.TACTIC_SHARED_MEMORY, s.tactic_shared_memory_kb << 10)
    config.tiling_optimization_level = getattr(trt.TilingOptimizationLevel, s.tiling_level.upper())
    if s.max_aux_streams is not None:
        config.max_aux_streams = s.max_aux_streams
    if s.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if trt.__name__ == "tensorrt_rtx":
        config.num_compute_capabilities = len(s.targets)
        for i, target in enumerate(s.targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, target.upper()), i)
    if s.timing_cache and timing_cache is not None and trt.__name__ != "tensorrt_rtx":  # RTX: documented no-op
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False)
    return config


def _save_timing_cache(config, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is not None:
        data = bytes(cache.serialize())
        if data:
            with atomic_file(path) as tmp:
                tmp.write_bytes(data)


def _default_profiles(network, max_batch: int, max_input: int, max_seq: int) -> list[dict]:
    """Split profiles read off the network's inputs (for graphs without export.json)."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    pasts = [t for t in inputs if t.name.startswith("past_key_values.")]
    max_seq = pasts[0].shape[2] if pasts[0].shape[2] > 0 else max_seq  # a static cache has its slots in the graph
    return make_profiles([t.name for t in inputs], {t.name: (t.shape[1], t.shape[3]) for t in pasts},
                         ShapesSection(max_batch=max_batch, max_input_len=max_input, max_seq_len=max_seq,
                                       profiles="split"))


_LAYER = re.compile(r"^Name: (.*?), LayerType: ([^,]+),(.*)$", re.M)
_WEIGHTS = re.compile(r"Constants: \[(.*?)\], Outputs:")


def _engine_layers(messages) -> list[dict]:
    """Each engine layer's name, type and the datatypes it reads (inputs) and holds (constants, i.e. weights):
    an int8 GEMM reads Int8 activations and holds Int8 weights; an int4 one holds Int4."""
    for _, msg in messages:
        if msg.startswith("Layers:"):
            layers = []
            for name, kind, rest in _LAYER.findall(msg):
                weights = _WEIGHTS.search(rest)
                held = sorted(set(re.findall(r"Datatype: (\w+)", weights.group(1)))) if weights else []
                reads = sorted(set(re.findall(r"Datatype: (\w+)", rest.split("Constants:")[0].split("Outputs:")[0])))
                layers.append({"name": name, "type": kind, "reads": reads, "holds": held})
            return layers
    return []
