"""`trtglm inspect` (what is in an ONNX file, an engine or a build dir) and `trtglm verify` (is a build intact)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..core.errors import TrtglmError
from ..core.files import sha256
from ..core.graphs import describe_onnx
from ..export.directory import ONNX_FILE
from .directory import BuildDir
from .tensorrt import gpu_compute_capability, import_backend, version_mismatch


class VerifyFailed(TrtglmError):
    pass


def inspect_path(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        if BuildDir.is_build(path):
            return _build_dir(BuildDir(path))
        if (path / ONNX_FILE).is_file():
            return {"kind": "export", "onnx": describe_onnx(path / ONNX_FILE)}
        raise TrtglmError(f"{path}: neither a build directory (manifest.json) nor an export (model.onnx)")
    if not path.is_file():
        raise TrtglmError(f"{path}: no such file or directory")
    if path.suffix == ".onnx":
        return {"kind": "onnx", "onnx": describe_onnx(path)}
    if path.suffix in (".engine", ".plan"):
        return {"kind": "engine", "engine": _engine(path)}
    raise TrtglmError(f"{path}: not an .onnx or .engine file")


def _engine(path: Path) -> dict:
    info = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    m = BuildDir(path.parent).manifest if BuildDir.is_build(path.parent) else {}
    if m:
        info.update(backend=m.get("backend"), targets=m.get("targets"), profiles=m.get("profile_names"))
    try:
        info["runtime"] = _deserialize(path, m.get("backend") or {})
    except VerifyFailed as e:
        info["runtime"] = {"checked": False, "reason": str(e)}
    return info


def graph_of(manifest: dict) -> dict:
    """Which logits and which KV cache a build's graph has (builds from before those options: all, dynamic)."""
    shapes = manifest.get("recipe", {}).get("resolved", {}).get("shapes", {})
    return {"logits": shapes.get("logits", "all"), "kv_cache": shapes.get("kv_cache", "dynamic"),
            "max_seq_len": manifest.get("max_seq_len")}


def _build_dir(build: BuildDir) -> dict:
    m = build.manifest
    out = {"kind": "build", "stage": m.get("stage"), "backend": m.get("backend"), "targets": m.get("targets"),
           "precision": m.get("precision"), "fusion": {k: m["fusion"][k] for k in ("fused", "nodes_before", "nodes_after")},
           "profiles": dict(zip(m.get("profile_names") or [], m.get("profiles") or [])),
           "io": m.get("io"), "engine": m.get("engine"), "engine_graph": m.get("engine_graph"),
           "estimate": m.get("estimate"), "cache": m.get("cache"), "calibration": m.get("calibration"),
           "accuracy": m.get("accuracy"), "stages": m.get("stages"), "stage_plan": m.get("stage_plan")}
    out["graph"] = graph_of(m)
    layers = build.layers()
    if layers is not None:
        out["engine_layer_types"] = dict(Counter(layer["type"] for layer in layers).most_common())
        out["gemm_datatypes"] = gemm_datatypes(layers)
    return out


def gemm_datatypes(layers: list[dict]) -> dict[str, int]:
    """How many engine GEMMs read which activations and hold which weights ("Int8 x Int8": 17), from the
    build log's layer list: the proof that a quantized graph got quantized kernels."""
    narrowest = ("Int4", "FP8", "Int8", "BFloat16", "Half", "Float")  # the weights; wider constants are scales
    out = Counter()
    for layer in layers:
        held = [d for d in narrowest if d in layer.get("holds", [])]
        if layer["type"] in ("gemm", "runtime_fusion") and held:
            reads = [d for d in layer.get("reads", []) if d not in ("Int64", "Int32")]  # shapes and positions
            out[f"{'/'.join(reads)} x {held[0]}"] += 1
    return dict(out.most_common())


def _deserialize(engine: Path, backend: dict) -> dict:
    """Deserialize with the TensorRT module the engine was built by, when it and a GPU are here; else say why not."""
    try:
        trt = import_backend(backend.get("name", "auto"))
    except TrtglmError as e:
        return {"checked": False, "reason": str(e)}
    mismatch = version_mismatch(trt, backend)
    if mismatch:
        raise VerifyFailed(f"{mismatch}: rebuild it here")
    if gpu_compute_capability() is None:
        return {"checked": False, "reason": "no GPU: TensorRT cannot deserialize an engine without one"}
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    obj = runtime.deserialize_cuda_engine(engine.read_bytes())
    if obj is None:
        return {"checked": True, "ok": False,
                "reason": f"{trt.__name__} {trt.__version__} cannot load this engine on this GPU "
                          "(built for another compute capability)"}
    return {"checked": True, "ok": True, "io": [obj.get_tensor_name(i) for i in range(obj.num_io_tensors)],
            "profiles": obj.num_optimization_profiles}


def verify(build_dir: str | Path, deserialize: bool = True) -> dict:
    """The manifest's hashes, and (with `deserialize`, a GPU and the engine's TensorRT module) that the engine
    loads here. The engine runner checks hashes only: it deserializes the engine itself, once."""
    build = BuildDir(build_dir)
    build_dir = build.path
    try:
        m = build.manifest
    except TrtglmError as e:
        raise VerifyFailed(str(e)) from None
    problems = build.check_hashes()
    if problems:
        raise VerifyFailed(f"{build_dir}: " + "; ".join(problems))
    result = {"hashes": "ok", "files": sorted(m.get("files", {}).get("sha256", {}))}
    if deserialize and build.engine.is_file():
        runtime = _deserialize(build.engine, m.get("backend") or {})
        if runtime.get("checked") and not runtime.get("ok"):
            raise VerifyFailed(f"{build.engine}: {runtime['reason']}")
        result["engine"] = runtime
    return result
