"""A build in stages: the budget's plan, checked before work; the built graph cut into stage graphs; one engine
per stage, each built in a process of its own so that the memory of one build is returned before the next.

    BUILD_DIR/stages/00/  model.onnx  model.onnx.data  [model.engine  build.log  layers.json]
                     01/  ...
The whole graph is not kept beside its stages: a staged build holds its weights once in ONNX and once in the
engines (the ONNX is what ONNX Runtime runs where no GPU is).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..core.dtypes import FLOATS
from ..core.errors import TrtglmError, UsageError
from ..core.memory import available_memory
from .directory import STAGES_DIR
from .stage_graphs import DATA_FILE, ONNX_FILE, LayerMap, StageGraph, cut, map_layers
from .stage_plan import StagePlan, plan_stages, smallest_budget
WEIGHT_BYTES = {**{name: d.bytes for name, d in FLOATS.items()}, "int8": 1, "fp8": 1, "int4": 0.5}


def stage_plan(onnx_path: Path, budget: int | None, dtype: str, exported: str, explicit: bool) -> StagePlan | None:
    """The stages a build of `onnx_path` (the export) in `dtype` needs within `budget` bytes (None: no limit
    known, one stage). Weights are scaled from the export's dtype to the build's. A graph whose weights are not
    named by layer, or a default budget too small for any stage, is built whole; a budget the user set
    (`explicit`) is kept or refused."""
    if budget is None:
        return None
    import onnx_ir as ir

    model = ir.load(onnx_path)
    model.graph.sort()
    try:
        layers = map_layers(model)
    except TrtglmError:
        if explicit:
            raise
        return None
    scale = WEIGHT_BYTES.get(dtype, 4) / WEIGHT_BYTES.get(exported, 4)
    scaled = LayerMap(layers.layers, {}, [int(b * scale) for b in layers.layer_bytes],
                      int(layers.head_bytes * scale), int(layers.tail_bytes * scale))
    if not explicit and budget < smallest_budget(scaled):
        return None  # the memory available now is no budget the user chose: build whole, as without one
    return plan_stages(scaled, budget)


def default_budget() -> int | None:
    return available_memory()


def check_disk(out_dir: Path, weight_bytes: int, engines: bool) -> None:
    """Refuse a build whose output cannot fit on the disk it is written to: the graph's weights, and as much
    again for the engines."""
    need = int(weight_bytes * (2 if engines else 1) * 1.05)
    parent = Path(out_dir).resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if need > free:
        raise UsageError(f"the build needs about {need / 2**30:.1f} GiB of disk for its graphs"
                         f"{' and engines' if engines else ''} and {parent} has {free / 2**30:.1f} GiB free",
                         hint="free disk space or write the build elsewhere")


def cut_build(tmp: Path, plan: StagePlan, hidden_size: int) -> list[StageGraph]:
    """Cut the build's graph (`tmp/model.onnx`) into its stages and remove the whole one."""
    stages = cut(tmp / ONNX_FILE, tmp / STAGES_DIR, plan.ranges, hidden_size)
    for name in (ONNX_FILE, DATA_FILE):
        (tmp / name).unlink(missing_ok=True)
    return stages


class StageInputs:
    """The hidden states each stage of the fp32 graph reads for every calibration window, computed stage by
    stage (one stage's session at a time) and kept on disk under `root` (stage i, window w: i/w.npz)."""

    def __init__(self, stages: list[StageGraph], calibration, root: Path):
        import onnxruntime as ort

        from ..core.graphs import describe_onnx
        from ..precision.calibration import _feeds

        self.root = root
        root.mkdir()
        windows = calibration.windows
        for i, stage in enumerate(stages[:-1]):
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            session = ort.InferenceSession(str(stage.path), opts, providers=["CPUExecutionProvider"])
            inputs = describe_onnx(stage.path)["inputs"]
            leaving = [name for name in stage.outputs if name.startswith("hidden.")]
            (root / str(i + 1)).mkdir()
            for w in range(len(windows)):
                feeds = _feeds(inputs, windows[w:w + 1]) | self.of(i)(w)
                values = session.run(leaving, feeds)
                np.savez(root / str(i + 1) / f"{w}.npz", **dict(zip(leaving, values)))
            del session

    def of(self, stage: int):
        """Window index -> the hidden states stage `stage` reads (none for the first)."""
        def load(window: int) -> dict:
            if stage == 0:
                return {}
            with np.load(self.root / str(stage) / f"{window}.npz") as data:
                return {name: data[name] for name in data.files}
        return load

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def stage_profiles(profiles: list[dict], inputs: list[str], hidden: int) -> list[dict]:
    """The whole graph's optimization profiles for one stage's inputs: its hidden states take the shape of the
    tokens they stand for ([B, S] of position_ids) with the hidden size."""
    out = []
    for profile in profiles:
        tokens = profile["position_ids"]
        out.append({name: ([(*dims, hidden) for dims in tokens] if name.startswith("hidden.") else profile[name])
                    for name in inputs})
    return out


def build_stage_engines(tmp: Path, stages: list[dict], profiles: list[dict], hidden: int, builder, dtype: str,
                        on_stage) -> list[dict]:
    """One engine per stage, each built in a fresh process; `on_stage(i, n)` before each. Returns each stage's
    engine summary (written into its directory by the child)."""
    import concurrent.futures
    import multiprocessing

    from .engine_job import run_job

    results = []
    context = multiprocessing.get_context("spawn")
    for i, stage in enumerate(stages):
        on_stage(i, len(stages))
        directory = tmp / STAGES_DIR / stage["dir"]
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            error, summary = pool.submit(run_job, directory, stage_profiles(profiles, stage["inputs"], hidden),
                                         builder, dtype).result()
        if error:
            raise TrtglmError(f"stage {i} (layers {stage['layers'][0]}-{stage['layers'][1] - 1}): {error}")
        results.append(summary)
    return results
