"""A build in stages: the budget's plan, checked before work; the export cut into stage graphs, one at a time
(each fused and converted before the next is cut, so no step holds more than one stage's weights); one engine
per stage, each built in a process of its own so that the memory of one build is returned before the next.

    BUILD_DIR/stages/00/  model.onnx  model.onnx.data  [model.engine  build.log  layers.json]
                     01/  ...
The whole graph is not kept beside its stages: a staged build holds its weights once in ONNX and once in the
engines (the ONNX is what ONNX Runtime runs where no GPU is).
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import numpy as np

from ..core.dtypes import FLOATS
from ..core.errors import TrtglmError, UsageError
from ..core.memory import available_memory
from .directory import STAGES_DIR
from .stage_graphs import StageGraph, map_layers
from .stage_plan import StageCost, StagePlan, plan_stages, smallest_budget

WEIGHT_BYTES = {**{name: d.bytes for name, d in FLOATS.items()}, "int8": 1, "fp8": 1, "int4": 0.5}


def stage_plan(onnx_path: Path, budget: int | None, dtype: str, exported: str, explicit: bool) -> StagePlan | None:
    """The stages a build of `onnx_path` (the export) in `dtype` needs within `budget` bytes (None: no limit
    known, one stage): each stage's conversion from the export's weights and its engine build over them in
    `dtype`. A graph whose weights are not named by layer, or a default budget too small for any stage, is built
    whole; a budget the user set (`explicit`) is kept or refused."""
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
    cost = stage_cost(dtype, exported)
    if not explicit and budget < smallest_budget(layers, cost):
        return None  # the memory available now is no budget the user chose: build whole, as without one
    return plan_stages(layers, budget, cost)


def stage_cost(dtype: str, exported: str) -> StageCost:
    """A stage's work in a build from `exported` weights to `dtype`: the conversion, where there is one, and the
    engine build over the weights in `dtype`."""
    from ..precision import conversion_peak

    conversion = None if dtype == exported else partial(conversion_peak, dtype)
    return StageCost(WEIGHT_BYTES.get(dtype, 4) / WEIGHT_BYTES.get(exported, 4), conversion)


def default_budget() -> int | None:
    return available_memory()


def check_disk(out_dir: Path, weight_bytes: int, engines: bool, transient: int = 0) -> None:
    """Refuse a build whose output cannot fit on the disk it is written to: the graph's weights, as much again
    for the engines, and `transient` bytes written and removed on the way."""
    need = int((weight_bytes * (2 if engines else 1) + transient) * 1.05)
    parent = Path(out_dir).resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if need > free:
        raise UsageError(f"the build needs about {need / 2**30:.1f} GiB of disk for its graphs"
                         f"{' and engines' if engines else ''} and {parent} has {free / 2**30:.1f} GiB free",
                         hint="free disk space or write the build elsewhere")


class StageInputs:
    """The hidden states each stage of the fp32 graph reads for every calibration window, on disk under `root`
    (stage i, window w: i/w.npz): a stage's are computed from the stage before (`advance`) before that stage is
    converted, and dropped once the stage that reads them is."""

    def __init__(self, calibration, root: Path):
        self.root = root
        self.windows = calibration.windows
        root.mkdir()

    def advance(self, stage: StageGraph) -> None:
        """Run the fp32 `stage` over every window: the inputs of the stage after it."""
        import onnxruntime as ort

        from ..core.graphs import describe_onnx
        from ..precision.calibration import _feeds

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(stage.path), opts, providers=["CPUExecutionProvider"])
        inputs = describe_onnx(stage.path)["inputs"]
        leaving = [name for name in stage.outputs if name.startswith("hidden.")]
        out = self.root / str(stage.index + 1)
        out.mkdir()
        read = self.of(stage.index)
        for w in range(len(self.windows)):
            values = session.run(leaving, _feeds(inputs, self.windows[w:w + 1]) | read(w))
            np.savez(out / f"{w}.npz", **dict(zip(leaving, values)))

    def of(self, stage: int):
        """Window index -> the hidden states stage `stage` reads (none for the first)."""
        def load(window: int) -> dict:
            if stage == 0:
                return {}
            with np.load(self.root / str(stage) / f"{window}.npz") as data:
                return {name: data[name] for name in data.files}
        return load

    def drop(self, stage: int) -> None:
        shutil.rmtree(self.root / str(stage), ignore_errors=True)

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
    engine summary (written into its directory by the child). An interruption stops the child's build too."""
    import multiprocessing

    from .engine_job import run_job

    results = []
    context = multiprocessing.get_context("spawn")
    for i, stage in enumerate(stages):
        on_stage(i, len(stages))
        directory = tmp / STAGES_DIR / stage["dir"]
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=run_job, args=(send, directory, stage_profiles(profiles, stage["inputs"], hidden),
                                                      builder, dtype), daemon=True)
        child.start()
        send.close()
        try:
            error, summary = receive.recv()
        except EOFError:  # it died without a word: killed (for memory, most often)
            child.join()
            error, summary = f"its build process ended with exit code {child.exitcode} and no result (killed for " \
                             "memory? a smaller --max-memory makes smaller stages)", None
        except BaseException:
            child.terminate()
            child.join()
            raise
        child.join()
        if error:
            raise TrtglmError(f"stage {i} (layers {stage['layers'][0]}-{stage['layers'][1] - 1}): {error}")
        results.append(summary)
    return results
