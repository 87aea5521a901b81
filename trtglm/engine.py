"""Build a TensorRT engine from an ONNX decoder: one code path for `tensorrt` and `tensorrt_rtx`.

    model.onnx ─ OnnxParser ─> network ─ profiles (prefill: past 0; decode: seq 1) ─> serialized engine
                                                                                      + per-layer kernel list

TensorRT-RTX builds on a CPU for explicit compute-capability targets; the per-layer list comes
from the `Layers:` message of a DETAILED-verbosity build (the engine inspector needs a GPU).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TrtglmError

BACKENDS = ("tensorrt_rtx", "tensorrt")
# Engine layers that launch no GPU kernel of their own.
NOT_KERNELS = {"shape_call", "ShapeHostToDevice", "NoOp", "Reformat"}
_LOGGER = None  # one logger for the whole process: TensorRT-RTX segfaults when loggers are freed and re-made


class BuildError(TrtglmError):
    def __init__(self, message: str, errors: list[str] | None = None):
        self.errors = errors or []
        detail = "; ".join(self.errors[:5]) + (f" (and {len(self.errors) - 5} more)" if len(self.errors) > 5 else "")
        super().__init__(message + (f": {detail}" if detail else ""))


def import_backend(name: str = "auto"):
    """The TensorRT module: tensorrt_rtx or tensorrt, whichever is installed (or the one asked for)."""
    import importlib

    for module in (BACKENDS if name == "auto" else (name,)):
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    raise TrtglmError(f"no TensorRT module ({'/'.join(BACKENDS) if name == 'auto' else name}) is installed",
                      hint="pip install 'trtglm[rtx]' (TensorRT for RTX, builds on a CPU) or 'trtglm[trt]'")


@dataclass
class Engine:
    plan: bytes
    backend: str
    seconds: float
    network_layers: int
    layers: list[dict] = field(default_factory=list)  # {"name", "type"} per engine layer, from the build log
    network_layer_types: dict[str, int] = field(default_factory=dict)

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


def build_engine(onnx_path: str | Path, *, targets: tuple[str, ...] = ("sm89",), max_batch: int = 1,
                 max_input_len: int = 128, max_seq_len: int = 256, backend: str = "auto") -> Engine:
    trt = import_backend(backend)
    log = _logger(trt)
    log.messages.clear()
    builder = trt.Builder(log)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        raise BuildError(f"{onnx_path}: the ONNX parser refused the graph",
                         [str(parser.get_error(i)) for i in range(parser.num_errors)])
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if targets and hasattr(config, "num_compute_capabilities"):
        config.num_compute_capabilities = len(targets)
        for i, target in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, target.upper()), i)
    for profile in _profiles(network, max_batch, max_input_len, max_seq_len):
        p = builder.create_optimization_profile()
        for name, shapes in profile.items():
            p.set_shape(name, *shapes)
        config.add_optimization_profile(p)
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    errors = [m for s, m in log.messages if s in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR)]
    if plan is None:
        raise BuildError("TensorRT could not build the engine", [e.splitlines()[0][:300] for e in errors])
    types = Counter(str(network.get_layer(i).type).split(".")[-1] for i in range(network.num_layers))
    return Engine(bytes(plan), trt.__name__, seconds, network.num_layers, _engine_layers(log.messages), dict(types))


def _profiles(network, max_batch: int, max_input: int, max_seq: int) -> list[dict]:
    """Prefill (no past, up to max_input new tokens) and decode (one token, up to max_seq-1 past)."""
    if not 0 < max_input <= max_seq or max_batch < 1:
        raise TrtglmError(f"impossible shapes: batch {max_batch}, input {max_input}, total {max_seq}")
    out = []
    for seq, past in (((1, max(1, max_input // 2), max_input), (0, 0, 0)),
                      ((1, 1, 1), (0, max_seq // 2, max_seq - 1))):
        opt_batch = 1
        shapes = {}
        for i in range(network.num_inputs):
            t = network.get_input(i)
            if t.name in ("input_ids", "position_ids"):
                shapes[t.name] = [(1, seq[0]), (opt_batch, seq[1]), (max_batch, seq[2])]
            elif t.name == "attention_mask":
                shapes[t.name] = [(1, seq[j] + past[j]) if j == 0 else ((opt_batch if j == 1 else max_batch),
                                                                          seq[j] + past[j]) for j in range(3)]
            else:
                kv, d = t.shape[1], t.shape[3]
                shapes[t.name] = [(1, kv, past[0], d), (opt_batch, kv, past[1], d), (max_batch, kv, past[2], d)]
        out.append(shapes)
    return out


_LAYER = re.compile(r"^Name: (.*?), LayerType: ([^,]+),", re.M)


def _engine_layers(messages) -> list[dict]:
    for _, msg in messages:
        if msg.startswith("Layers:"):
            return [{"name": n, "type": t} for n, t in _LAYER.findall(msg)]
    return []
