"""`trtglm build`: export dir + recipe -> fused graph -> TensorRT engine -> BUILD_DIR.

    EXPORT_DIR ─ recipe ─ checks (precision, targets, shapes) ─ cache? ─ fuse ─ engine ─> BUILD_DIR/
        model.engine  model.onnx(+.data)  [engine.onnx]  manifest.json  layers.json  build.log  tokenizer files

The cache key hashes what determines the result: the export's graph and weights (their sha256),
the resolved recipe, the backend and its version, and trtglm's version and source (fusion is
deterministic).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..core.dtypes import compute_dtype
from ..core.errors import TrtglmError, UsageError
from ..core.files import atomic_dir, sha256
from ..core.files import cache_dir as trtglm_cache
from ..core.graphs import describe_onnx, graph_dtype, release_weights, save_streaming
from ..core.memory import peak_rss
from ..core.progress import SILENT, Progress
from ..core.recipe import Recipe, load_recipe
from ..core.versions import source_digest, tool_versions
from ..export.directory import DATA_FILE, ONNX_FILE, ExportDir
from ..fusion import FusionError, FusionReport, expected_counts, fuse, model_counts, model_fusions, total
from ..model.tokenizer import load_text
from ..precision import CALIBRATED, Conversion, check_memory, convert
from ..precision.calibration import CalibrationSet
from ..runtime.backends import OrtBackend
from ..runtime.evaluate import GateFailed, compare, judge
from ..runtime.staged import StagedBackend
from .builder import plan_shapes
from .directory import ENGINE_FILE, ENGINE_ONNX_FILE, MANIFEST_FILE, MANIFEST_VERSION
from .engine_job import write_engine
from .last_logits import keep_last_position
from .stage_plan import StagePlan
from .stage_graphs import plan_cut, write_stage
from .staged_build import (
    STAGES_DIR,
    WEIGHT_BYTES,
    StageInputs,
    build_stage_engines,
    check_disk,
    default_budget,
    stage_plan,
    stage_profiles,
)
from .static_cache import make_static
from .tensorrt import check_features, check_targets, import_backend


def default_cache_dir() -> Path:
    return trtglm_cache() / "engines"


@dataclass(frozen=True)
class BuildPlan:
    """What a build does, resolved and checked before any work: the build's steps read this, nothing else."""

    source: ExportDir
    recipe: Recipe  # resolved: the export's dtype and sequence length filled in, the precision's accuracy goals
    recipe_file: Path | None
    dtype: str  # the build's precision
    exported: str  # the export's
    calibration: CalibrationSet | None
    gate: Path | None  # the fp32 reference export the accuracy gate compares with
    backend: dict | None  # TensorRT module and version (None: --onnx-only)
    cache_dir: Path
    stages: StagePlan | None  # the layer ranges of a build in stages (None or one range: the whole graph)
    key: str  # the build cache's key: a digest of everything above that decides the result

    @property
    def staged(self) -> bool:
        return self.stages is not None and len(self.stages.ranges) > 1

    @property
    def onnx_only(self) -> bool:
        return self.backend is None


def plan_build(export_dir: str | Path, *, recipe: str | Path | None = None, overrides: dict | None = None,
               onnx_only: bool = False, cache_dir: Path | None = None, reference: str | Path | None = None,
               **shortcuts) -> BuildPlan:
    """Everything checked that can be checked before work starts: the export, the recipe, memory, calibration
    data, the reference, the TensorRT module and targets."""
    source = ExportDir(export_dir).require_graph()
    meta = source.meta
    r = load_recipe(recipe, _merge_shortcuts(overrides or {}, shortcuts))
    exported = source.dtype or graph_dtype(source.onnx)
    r, dtype = _resolve(r, meta, exported, source.path)
    explicit = r.builder.max_memory_bytes
    stages = stage_plan(source.onnx, explicit or default_budget(), dtype, exported, explicit=explicit is not None)
    if dtype != exported and (stages is None or len(stages.ranges) == 1):  # a staged plan holds its conversions
        check_memory(dtype, source.data_bytes)
    calibration = _calibration(r, dtype, exported, meta, source.path)
    gate = _gate_reference(r, dtype, source.path, reference) if r.accuracy.gate else None
    if gate is not None and stages is not None and len(stages.ranges) > 1:
        _check_gate_memory(gate, stages)
    backend = None
    if not onnx_only:
        trt = import_backend(r.builder.backend)
        check_targets(r.builder.targets, dtype, trt.__name__)
        check_features(trt, r.shapes.kv_cache)
        backend = {"name": trt.__name__, "version": trt.__version__}
    key = _cache_key(source, r, backend, onnx_only, calibration, stages)
    return BuildPlan(source, r, Path(recipe) if recipe else None, dtype, exported, calibration, gate, backend,
                     cache_dir or default_cache_dir(), stages, key)


def build(export_dir: str | Path, out_dir: str | Path, *, recipe: str | Path | None = None,
          overrides: dict | None = None, onnx_only: bool = False, cache_dir: Path | None = None,
          use_cache: bool = True, force: bool = False, reference: str | Path | None = None,
          progress: Progress = SILENT, **shortcuts) -> dict:
    """Returns the manifest. `shortcuts` (fusions, strict, max_seq_len) are overrides for library callers.

    `reference` is the fp32 export the accuracy gate compares with (default: EXPORT_DIR when it is fp32)."""
    plan = plan_build(export_dir, recipe=recipe, overrides=overrides, onnx_only=onnx_only, cache_dir=cache_dir,
                      reference=reference, **shortcuts)
    return run_build(plan, out_dir, use_cache=use_cache, force=force, progress=progress)


def run_build(plan: BuildPlan, out_dir: str | Path, *, use_cache: bool = True, force: bool = False,
              progress: Progress = SILENT) -> dict:
    """BUILD_DIR from `plan`, through the build cache unless `use_cache` is False; returns the manifest."""
    cache = plan.cache_dir / plan.key if use_cache and not plan.onnx_only else None
    started = time.perf_counter()
    if cache is None or not (cache / MANIFEST_FILE).is_file():  # a cache hit links the files it has
        scale = WEIGHT_BYTES.get(plan.dtype, 4) / WEIGHT_BYTES.get(plan.exported, 4)
        # a staged conversion also holds one stage in the export's dtype until it is converted
        transient = int(max(plan.stages.weight_bytes) / scale) if plan.staged and scale != 1 else 0
        check_disk(Path(out_dir), int(plan.source.data_bytes * scale), engines=not plan.onnx_only,
                   transient=transient)
    with atomic_dir(out_dir, force=force) as tmp:
        if cache is not None:
            from filelock import FileLock

            cache.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(cache) + ".lock"):
                if not (cache / MANIFEST_FILE).is_file():
                    _build_into(tmp, plan, progress)
                    _store(tmp, cache)
                    manifest = json.loads((tmp / MANIFEST_FILE).read_text())
                    manifest["cache"] = {"key": plan.key, "hit": False}
                else:
                    _restore(cache, tmp)
                    manifest = json.loads((tmp / MANIFEST_FILE).read_text())
                    manifest["cache"] = {"key": plan.key, "hit": True,
                                         "seconds": round(time.perf_counter() - started, 2)}
                    # the same export and recipe by content (the key); where they are is this build's
                    manifest["source"]["export_dir"] = str(plan.source.path.resolve())
                    manifest["recipe"] |= _recipe_file(plan)
        else:
            manifest = _build_into(tmp, plan, progress)
            manifest["cache"] = {"key": plan.key, "hit": False, "disabled": True}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _recipe_file(plan: BuildPlan) -> dict:
    f = plan.recipe_file
    return {"file": str(f) if f else None, "file_sha256": sha256(f) if f else None}


def _merge_shortcuts(overrides: dict, shortcuts: dict) -> dict:
    out = {k: dict(v) for k, v in overrides.items()}
    if "fusions" in shortcuts:
        out.setdefault("fusion", {})["fusions"] = tuple(sorted(shortcuts["fusions"]))
    if "strict" in shortcuts:
        out.setdefault("fusion", {})["strict"] = shortcuts["strict"]
    if shortcuts.get("max_seq_len"):
        out.setdefault("shapes", {})["max_seq_len"] = shortcuts["max_seq_len"]
    unknown = set(shortcuts) - {"fusions", "strict", "max_seq_len"}
    if unknown:
        raise TypeError(f"unknown build options {sorted(unknown)}")
    return out


def _resolve(r: Recipe, meta: dict | None, exported: str, export_dir: Path) -> tuple[Recipe, str]:
    """Fill what the recipe leaves to the export (dtype, sequence length) and check they agree."""
    dtype = r.precision.dtype or exported
    if dtype != exported and exported != "fp32":
        raise UsageError(f"precision {dtype} requested but {export_dir} was exported in {exported}: precision "
                         "conversion starts from an fp32 export",
                         hint=f"re-export with `trtglm export ... --dtype fp32`, or with --dtype {dtype}")
    limit = (meta or {}).get("max_seq_len")
    shapes = r.shapes
    explicit = "max_seq_len" in shapes.model_fields_set
    if limit and shapes.max_seq_len > limit:
        if explicit:
            raise UsageError(f"max_seq_len {shapes.max_seq_len} exceeds the export's max_seq_len {limit}")
        shapes = shapes.model_copy(update={"max_seq_len": limit,
                                           "max_input_len": min(shapes.max_input_len, limit)})
    if shapes.kv_cache == "static" and (meta or {}).get("config", {}).get("mla"):
        raise UsageError("kv_cache: static is not available for multi-head latent attention (glm4_moe_lite): the "
                         "static cache rewrites fused Attention ops, and MLA has none", hint="use kv_cache: dynamic")
    precision = r.precision.model_copy(update={"dtype": dtype})
    windows = {}  # calibration and accuracy windows run on the graph: at most its sequence length (the fused
    # rotary tables hold the build's max_seq_len positions)
    for name in ("calibration", "accuracy"):
        section = getattr(r, name)
        if section.seq_len > shapes.max_seq_len:
            if "seq_len" in section.model_fields_set:
                raise UsageError(f"{name}.seq_len {section.seq_len} exceeds the build's max_seq_len "
                                 f"{shapes.max_seq_len}")
            windows[name] = section.model_copy(update={"seq_len": shapes.max_seq_len})
    r = r.model_copy(update=windows)
    fusion = r.fusion
    if shapes.kv_cache == "static" and "fusions" not in fusion.model_fields_set:
        # keys are folded into their projection only because TensorRT-RTX cannot build a RotaryEmbedding feeding
        # the cache Concat; a static cache has no Concat, and with RotaryEmbedding keys Myelin computes q, k and
        # both cache writes in one kernel (bench/fusion.py: 9.2 decode kernels per layer, 10.1 with folded keys)
        fusion = fusion.model_copy(update={"fusions": tuple(
            "rotary_keys" if f == "rotary_keys_folded" else f for f in fusion.fusions)})
    return r.model_copy(update={"shapes": shapes, "precision": precision, "fusion": fusion,
                                "accuracy": r.accuracy.for_dtype(dtype)}), dtype



def _calibration(r: Recipe, dtype: str, exported: str, meta: dict | None, export_dir: Path):
    """The token windows a precision conversion calibrates on: required for int8/fp8, used by fp16 for its
    range check when the export has a tokenizer; None otherwise."""

    wanted = dtype != exported and (dtype in CALIBRATED or dtype == "fp16")
    if not wanted:
        return None
    if dtype == "fp16" and not (export_dir / "tokenizer.json").is_file():
        return None  # the manifest records that no range check ran
    if meta is None:
        raise UsageError(f"{dtype} calibration needs the export's export.json (vocabulary, IO)")

    c = r.calibration
    method = {"fp8": "minmax", "fp16": "minmax"}.get(dtype, c.method)  # amax for fp8 scales and fp16 ranges
    return CalibrationSet.load(c.data, export_dir, c.samples, c.seq_len, method, meta["config"]["vocab_size"])


def _gate_reference(r: Recipe, dtype: str, export_dir: Path, reference) -> Path:
    if dtype == "bf16":
        raise UsageError("the accuracy gate runs on ONNX Runtime's CPU provider, which cannot compute bf16",
                         hint="build without the gate and check the engine with `trtglm eval --backend trt` on a GPU")
    return ExportDir(Path(reference) if reference else export_dir).require_fp32_reference().path


def _check_gate_memory(reference: Path, stages: StagePlan) -> None:
    """The accuracy gate runs the fp32 reference and the chain of stages side by side, each whole in memory:
    refused before any work where that is past the budget the stages keep."""
    need = ExportDir(reference).data_bytes + sum(stages.weight_bytes)
    if need > stages.budget:
        raise UsageError(f"the accuracy gate holds the fp32 reference and every stage in memory at once (about "
                         f"{need / 2**30:.1f} GiB), past the build's memory budget of {stages.budget / 2**30:.1f} GiB",
                         hint="build with accuracy.gate: false and measure with `trtglm eval` where memory allows")


def _cache_key(source: ExportDir, r: Recipe, backend: dict | None, onnx_only: bool, calibration,
               stages: StagePlan | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"export": source.hashes(), "recipe": r.resolved(), "backend": backend, "trtglm": __version__,
                         "source": source_digest(), "onnx_only": onnx_only,
                         "calibration": calibration and calibration.fingerprint,
                         "stages": stages.ranges if stages and len(stages.ranges) > 1 else None},
                        sort_keys=True).encode())
    return h.hexdigest()[:32]


def _build_into(tmp: Path, plan: BuildPlan, progress: Progress) -> dict:
    source, meta, r = plan.source, plan.source.meta, plan.recipe

    started = time.perf_counter()
    for f in source.sidecars():
        shutil.copy2(f, tmp / f.name)
    if plan.staged:
        report, precision, accuracy, graph, stages = _staged_graphs(tmp, plan, progress)
    else:
        with progress.step("fusing"):
            model = _load(source.onnx)
            layers = sum(1 for v in model.graph.inputs
                         if v.name.startswith("past_key_values.") and v.name.endswith(".key"))
            report = _fuse(model, plan, meta["config"]["num_layers"] if meta else layers)
            release_weights(model)  # the weights fusion read (mapped from the export: resident until released)
            save_streaming(model, tmp / ONNX_FILE, DATA_FILE)
            del model
        precision, accuracy, graph, stages = *_graph_steps(tmp, plan, progress), None
    fusions = model_fusions(frozenset(r.fusion.fusions), meta["config"]) if meta else frozenset(r.fusion.fusions)
    manifest = {
        "format_version": MANIFEST_VERSION,
        "stage": "onnx" if plan.onnx_only else "engine",
        "recipe": {**_recipe_file(plan), "resolved": r.resolved(),
                   "resolved_sha256": hashlib.sha256(json.dumps(r.resolved(), sort_keys=True).encode()).hexdigest()},
        "source": {"export_dir": str(source.path.resolve()), "export_sha256": (meta or {}).get("files", {}).get("sha256"),
                   "checkpoint": (meta or {}).get("source")},
        "calibration": plan.calibration.describe() if plan.calibration else None,
        "precision": precision | {"ops": graph["initializer_dtypes"]},
        "accuracy": accuracy,
        "max_seq_len": r.shapes.max_seq_len,
        "io": _io(meta, graph) if not stages else _staged_io(stages),
        "fusion": report.to_dict() | {"strict": r.fusion.strict, "fusions": sorted(fusions)},
        "tools": tool_versions(),
        "host": platform.node(),
        "cache_key": plan.key,
    }
    if stages:
        manifest["stages"] = stages
        manifest["stage_plan"] = plan.stages.to_dict()
    if not plan.onnx_only:
        manifest.update(_engine_step(tmp, plan, manifest, progress))
    kept = (ONNX_FILE, DATA_FILE, ENGINE_FILE, ENGINE_ONNX_FILE)
    files = [p for p in sorted(tmp.iterdir()) if p.name in kept] + [
        p for p in sorted((tmp / STAGES_DIR).glob("*/*")) if p.name in kept]
    manifest["files"] = {"sha256": {str(p.relative_to(tmp)): sha256(p) for p in files}}
    manifest["build_seconds"] = round(time.perf_counter() - started, 2)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _load(onnx_path: Path):
    import onnx_ir as ir

    try:
        return ir.load(onnx_path)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: one line
        raise TrtglmError(f"{onnx_path}: cannot be read as ONNX ({str(e).splitlines()[0]})") from None


def _fuse(model, plan: BuildPlan, layers: int, final_norm: bool = True) -> FusionReport:
    """Fuse `model` (the export's graph of `layers` layers, or a stage of it) in place, checked against the
    fused ops a decoder of that many layers must have (a stage before the last has no final norm)."""
    meta, r = plan.source.meta, plan.recipe
    fusions = frozenset(r.fusion.fusions)
    if meta:
        fusions = model_fusions(fusions, meta["config"])
        expected = model_counts(meta["config"], meta["family"], layers, fusions, final_norm)
    else:
        expected = expected_counts(layers, None, fusions, final_norm=final_norm) if layers else None
    return fuse(model, max_positions=r.shapes.max_seq_len, expected=expected, strict=r.fusion.strict,
                fusions=fusions)


def _graph_steps(tmp: Path, plan: BuildPlan, progress: Progress) -> tuple[dict, dict | None, dict]:
    """The fused graph (tmp/model.onnx) through precision, the accuracy gate, the cache form and the logits:
    (the precision record, the gate's result, the graph's description)."""
    r = plan.recipe
    precision = {"dtype": plan.dtype}
    if plan.dtype != plan.exported:
        precision = _precision_step(tmp, plan, progress)
    accuracy = _gate_step(OrtBackend(tmp / ONNX_FILE), tmp, plan, progress) if plan.gate else None
    if r.shapes.kv_cache == "static":
        make_static(tmp / ONNX_FILE, r.shapes.max_seq_len)
    if r.shapes.logits == "last":  # after the gate, which needs every position, and the cache's one shared mask
        keep_last_position(tmp / ONNX_FILE)
    return precision, accuracy, describe_onnx(tmp / ONNX_FILE)


def _staged_graphs(tmp: Path, plan: BuildPlan, progress: Progress) -> tuple:
    """The export cut into its stages, one stage at a time through fusion and precision (calibrated on the
    hidden states the fp32 stages before it compute), so no step holds more than one stage's weights; then the
    gate on the chain of stages, the cache form in every stage, the last position's logits in the last.
    Returns (the fusion report, the precision record, the gate's result, the graph's description, the stages)."""
    r, meta = plan.recipe, plan.source.meta
    ranges = plan.stages.ranges
    n = len(ranges)
    cut = plan_cut(plan.source.onnx, ranges, meta["config"]["hidden_size"] if meta else None)
    converting = plan.dtype != plan.exported
    inputs = StageInputs(plan.calibration, tmp / ".stage-inputs") if converting and plan.calibration else None
    stages, reports, records, peaks = [], [], [], []
    with progress.step(f"{n} stages", total=n) as step:
        for i, (first, end) in enumerate(ranges):
            name = f"stage {i + 1} of {n} (layers {first}-{end - 1})"
            progress.update(step, completed=i, description=f"{name}: fusing")
            model = cut.stage(i)
            try:
                reports.append(_fuse(model, plan, end - first, final_norm=i == n - 1))
            except FusionError as e:
                raise FusionError(f"{name}: {e}") from None
            release_weights(model)
            stage = write_stage(model, tmp / STAGES_DIR / f"{i:02d}", i, (first, end))
            del model
            peaks.append({"cut_and_fuse": peak_rss()})  # the process's peak so far, after each step
            if converting:
                if inputs and i < n - 1:
                    progress.update(step, description=f"{name}: the next stage's calibration inputs")
                    inputs.advance(stage)

                def on_sample(done: int, total: int, name=name) -> None:
                    progress.update(step, description=f"{name}: {plan.dtype} ({done}/{total} windows)")

                progress.update(step, description=f"{name}: {plan.dtype}")
                records.append(_convert(stage.path, plan, on_sample, inputs.of(i) if inputs else None))
                peaks[-1]["convert"] = peak_rss()
                if inputs:
                    inputs.drop(i)
            stages.append(stage)
        if inputs:
            inputs.remove()
        progress.update(step, completed=n)
    precision = {"dtype": plan.dtype}
    if records:
        precision = dict(records[0]) | {"seconds": round(sum(r["seconds"] for r in records), 2), "stages": records}
        if "quantized_nodes" in precision:
            precision["quantized_nodes"] = sum(r["quantized_nodes"] for r in records)
            precision["kept_half"] = [name for r in records for name in r["kept_half"]]
        experts = [r["experts"] for r in records if "experts" in r]
        if experts:
            precision["experts"] = experts[0] | {k: sum(e[k] for e in experts) for k in ("stacked_weights", "parameters")}
    accuracy = None
    if plan.gate:
        chain = StagedBackend([OrtBackend(s.path) for s in stages])
        accuracy = _gate_step(chain, tmp, plan, progress)
    if r.shapes.kv_cache == "static":
        for s in stages:
            make_static(s.path, r.shapes.max_seq_len)
    if r.shapes.logits == "last":
        keep_last_position(stages[-1].path)
    described = [describe_onnx(s.path) for s in stages]
    entries = [s.to_dict() | {"inputs": [v["name"] for v in d["inputs"]], "outputs": [v["name"] for v in d["outputs"]],
                              "io": _io(meta, d), "weight_bytes": (s.path.parent / DATA_FILE).stat().st_size,
                              "graph_peak_rss_bytes": p}
               for s, d, p in zip(stages, described, peaks)]  # as the steps after the cut left them (a static cache's inputs)
    ops: dict[str, int] = {}
    for d in described:
        for op, count in d["initializer_dtypes"].items():
            ops[op] = ops.get(op, 0) + count
    return total(reports), precision, accuracy, {"initializer_dtypes": ops}, entries


def _staged_io(stages: list[dict]) -> dict | None:
    """A staged build's IO as one model's: every stage's, less the hidden states passed between them."""
    if any(s["io"] is None for s in stages):
        return None
    out = {}
    for side in ("inputs", "outputs"):
        seen: dict[str, dict] = {}
        for s in stages:
            for spec in s["io"][side]:
                if not spec["name"].startswith("hidden."):
                    seen.setdefault(spec["name"], spec)
        out[side] = sorted(seen.values(), key=lambda spec: spec["name"] != "logits")
    return out


def _precision_step(tmp: Path, plan: BuildPlan, progress: Progress) -> dict:
    calibrating = plan.calibration is not None
    with progress.step(f"{plan.dtype}: {'calibrating' if calibrating else 'converting'}") as step:

        def on_sample(i: int, n: int) -> None:
            progress.update(step, completed=i, total=n)

        return _convert(tmp / ONNX_FILE, plan, on_sample)


def _convert(onnx_path: Path, plan: BuildPlan, on_sample, stage_inputs=None) -> dict:
    """The plan's precision conversion of one graph (the build's, or a stage's), in place; its ranges are cached
    under the graph's and its weights' sha256."""
    graph = hashlib.sha256((sha256(onnx_path) + sha256(onnx_path.parent / DATA_FILE)).encode()).hexdigest()
    return convert(Conversion(onnx_path, DATA_FILE, plan.dtype, plan.recipe.precision, plan.calibration,
                              plan.cache_dir / "calibration", graph, on_sample, stage_inputs))


def _gate_step(candidate, tmp: Path, plan: BuildPlan, progress: Progress) -> dict:
    a = plan.recipe.accuracy
    with progress.step("accuracy gate"):
        result = compare(candidate, plan.gate, load_text(tmp), a.data, a.samples, a.seq_len)
    result["gate"] = judge(result, a)
    if not result["gate"]["passed"]:
        raise GateFailed("accuracy gate failed: " + "; ".join(result["gate"]["failures"]) + " (nothing published)")
    return result


def _io(meta: dict | None, graph: dict) -> dict | None:
    """The built graph's IO tensors (`describe_onnx`): the export's, retyped by a precision conversion (the KV
    cache), reshaped by `logits: last` and by a static cache (which adds `cache_position`)."""
    if not meta:
        return None
    return {side: [{"name": v["name"], "dtype": {"float": "float32"}.get(v["dtype"], v["dtype"]), "shape": v["shape"]}
                   for v in graph[side]] for side in ("inputs", "outputs")}


def _engine_step(tmp: Path, plan: BuildPlan, manifest: dict, progress: Progress) -> dict:
    meta, r = plan.source.meta, plan.recipe
    if meta is None:
        raise UsageError("an engine build needs the export's export.json (IO spec and config)",
                         hint="pass --onnx-only for graphs from other exporters")
    shapes = plan_shapes(manifest["io"], meta["config"], r.shapes, compute_dtype(plan.dtype).bytes)
    stages = manifest.get("stages")
    weights = sum(s["weight_bytes"] for s in stages) if stages else \
        (tmp / DATA_FILE).stat().st_size if (tmp / DATA_FILE).exists() else 0
    progress.note(f"estimate: engine about {weights / 1e6:.0f} MB of weights, KV cache "
                  f"{shapes.kv_cache_bytes / 1e6:.0f} MB and activations {shapes.activation_bytes / 1e6:.0f} MB at "
                  f"the maximum shapes; building for {', '.join(r.builder.targets)}"
                  + (f" in {len(stages)} stages" if stages else ""))
    if stages:
        built = _engine_stages(tmp, plan, stages, shapes, progress)
    else:
        with progress.step("TensorRT build") as step:

            def on_step(phase: str, done: int, total: int) -> None:
                progress.update(step, description=f"TensorRT: {phase}", completed=done, total=total or None)

            built = write_engine(tmp, shapes.profiles, r.builder, plan.dtype, on_step)
    return built | {
        "targets": list(r.builder.targets),
        "profiles": [{name: [list(s) for s in dims] for name, dims in p.items()} for p in shapes.profiles],
        "profile_names": ["prefill", "decode"] if len(shapes.profiles) == 2 else ["prefill+decode"],
        "estimate": {"weights_bytes": weights, "kv_cache_bytes": shapes.kv_cache_bytes,
                     "activation_bytes": shapes.activation_bytes},
    }


def _engine_stages(tmp: Path, plan: BuildPlan, stages: list[dict], shapes, progress: Progress) -> dict:
    """One engine per stage, each in a process of its own; the stages' entries gain their engine's fields."""
    with progress.step("TensorRT build") as step:

        def on_stage(i: int, n: int) -> None:
            progress.update(step, description=f"TensorRT: stage {i + 1} of {n}", completed=i, total=n)

        built = build_stage_engines(tmp, stages, shapes.profiles, plan.source.meta["config"]["hidden_size"],
                                    plan.recipe.builder, plan.dtype, on_stage)
    hidden = plan.source.meta["config"]["hidden_size"]
    for stage, summary in zip(stages, built):
        stage["engine"] = summary["engine"] | {"peak_rss_bytes": summary["peak_rss_bytes"]}
        stage["engine_graph"] = summary["engine_graph"]
        stage["profiles"] = [{name: [list(d) for d in dims] for name, dims in p.items()}
                             for p in stage_profiles(shapes.profiles, stage["inputs"], hidden)]
    first = built[0]
    total = {k: sum(s["engine"][k] for s in built) for k in ("bytes", "network_layers", "engine_layers", "kernels",
                                                             "tensorrt_build_seconds")}
    return {"backend": first["backend"], "engine_graph": first["engine_graph"], "engine": total}


def _store(tmp: Path, cache: Path) -> None:
    staging = cache.with_name(cache.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for f in tmp.iterdir():
        _link_or_copy(f, staging / f.name)
    os.replace(staging, cache)


def _restore(cache: Path, tmp: Path) -> None:
    for f in cache.iterdir():
        _link_or_copy(f, tmp / f.name)


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():  # a staged build's stages/
        dst.mkdir()
        for f in src.iterdir():
            _link_or_copy(f, dst / f.name)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
