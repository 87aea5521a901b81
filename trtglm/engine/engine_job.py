"""One engine from a graph directory: the attention form, TensorRT's build, and the engine, build log and layer
list written beside the graph. A staged build runs each stage's job in a process of its own (`run_job`)."""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Callable

from ..core.errors import TrtglmError
from ..core.files import cache_dir
from ..core.memory import peak_rss
from .builder import build_engine
from .directory import ENGINE_FILE, ENGINE_ONNX_FILE, LAYERS_FILE, LOG_FILE, ONNX_FILE
from .engine_graph import attention_form, write_engine_graph


def write_engine(directory: Path, profiles: list[dict], builder, dtype: str,
                 on_step: Callable[[str, int, int], None] | None = None) -> dict:
    """Build `directory/model.onnx` (or the engine graph written beside it) into `directory/model.engine`;
    returns the manifest's engine fields."""
    graph = {"file": ONNX_FILE, "attention": "layer"}
    form = attention_form(builder.attention, len(profiles))
    if form != "layer":
        lowered = write_engine_graph(directory / ONNX_FILE, directory / ENGINE_ONNX_FILE, form)
        if lowered["kept"] and builder.attention == form:
            raise TrtglmError(f"builder.attention: {form}, but {lowered['kept']} of {lowered['attention_ops']} "
                              f"Attention ops stay ops: {lowered['why_kept']}",
                              hint="use builder.attention: auto or layer")
        if lowered["decomposed"]:
            graph = lowered
        else:  # nothing written out (auto): the layer, and why
            graph |= {k: lowered[k] for k in ("attention_ops", "why_kept") if k in lowered}
    engine = build_engine(directory / graph["file"], profiles=profiles, builder=builder, dtype=dtype,
                          on_step=on_step, timing_cache=cache_dir() / f"timing-{builder.backend}.cache",
                          write_to=directory / ENGINE_FILE)
    (directory / LOG_FILE).write_text("\n".join(engine.log) + "\n")
    (directory / LAYERS_FILE).write_text(json.dumps({"network_layer_types": engine.network_layer_types,
                                                     "engine_layers": engine.layers}, indent=1) + "\n")
    return {"backend": {"name": engine.backend, "version": engine.version}, "engine_graph": graph,
            "engine": {"bytes": (directory / ENGINE_FILE).stat().st_size, "network_layers": engine.network_layers,
                       "engine_layers": len(engine.layers), "kernels": len(engine.kernels),
                       "tensorrt_build_seconds": round(engine.seconds, 2)}}


def run_job(result, directory: Path, profiles: list[dict], builder, dtype: str) -> None:
    """`write_engine` in a child process, sending (None, summary) or (the error's one line, None) through the
    connection `result`. Its peak memory is the process's own (VmHWM: getrusage's maximum carries the parent's
    across the exec that started it)."""
    try:
        summary = write_engine(directory, profiles, builder, dtype)
        summary["peak_rss_bytes"] = peak_rss()
        outcome = None, summary
    except TrtglmError as e:
        outcome = str(e), None
    except Exception as e:  # noqa: BLE001 - the parent reports it as the stage's error
        outcome = f"{type(e).__name__}: {e} ({traceback.format_exc(limit=-1).strip().splitlines()[-1]})", None
    result.send(outcome)
    result.close()
