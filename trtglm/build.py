"""`trtglm build`: export dir -> fused (and later precision-rewritten) graph -> BUILD_DIR.

    EXPORT_DIR/model.onnx ─ fuse ─> BUILD_DIR/model.onnx (+ .data), manifest.json, tokenizer files
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .atomic import atomic_dir
from .errors import TrtglmError, UsageError
from .export import DATA_FILE, META_FILE, ONNX_FILE, sha256, tool_versions
from .fusion import DEFAULT_FUSIONS, expected_counts, fuse

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1


def build(export_dir: str | Path, out_dir: str | Path, *, onnx_only: bool = False, strict: bool = True,
          max_seq_len: int | None = None, fusions: frozenset[str] = DEFAULT_FUSIONS, force: bool = False,
          progress=None) -> dict:
    import onnx_ir as ir

    if not onnx_only:
        raise UsageError("the TensorRT engine step of `trtglm build` is not available yet",
                         hint="pass --onnx-only to write the fused ONNX graph")
    export_dir = Path(export_dir)
    onnx_path = export_dir / ONNX_FILE
    if not onnx_path.is_file():
        raise TrtglmError(f"{export_dir}: no {ONNX_FILE} (not a `trtglm export` directory)")
    meta = _export_meta(export_dir)
    max_positions = max_seq_len or (meta or {}).get("max_seq_len")
    if not max_positions:
        raise UsageError(f"{export_dir} has no {META_FILE}: pass --max-seq-len for the rotary tables")
    started = time.perf_counter()
    try:
        model = ir.load(onnx_path)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: one line
        raise TrtglmError(f"{onnx_path}: cannot be read as ONNX ({str(e).splitlines()[0]})") from None
    layers = sum(1 for v in model.graph.inputs if v.name.startswith("past_key_values.") and v.name.endswith(".key"))
    if meta:
        expected = expected_counts(meta["config"]["num_layers"], meta["family"] == "glm4", fusions)
    else:
        expected = expected_counts(layers, None, fusions) if layers else None
    report = fuse(model, max_positions=max_positions, expected=expected, strict=strict, fusions=fusions)
    with atomic_dir(out_dir, force=force) as tmp:
        ir.save(model, tmp / ONNX_FILE, external_data=DATA_FILE, max_in_flight_bytes=256 << 20)
        for f in _sidecars(export_dir, meta):
            shutil.copy2(f, tmp / f.name)
        manifest = {
            "format_version": MANIFEST_VERSION,
            "stage": "onnx",
            "source_export": {"path": str(export_dir.resolve()), "export_json": meta is not None,
                              "sha256": {ONNX_FILE: sha256(onnx_path)}},
            "max_seq_len": max_positions,
            "fusion": report.to_dict() | {"strict": strict, "fusions": sorted(fusions)},
            "files": {"onnx": ONNX_FILE, "data": DATA_FILE,
                      "sha256": {n: sha256(tmp / n) for n in (ONNX_FILE, DATA_FILE) if (tmp / n).exists()}},
            "tools": tool_versions(),
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _export_meta(export_dir: Path) -> dict | None:
    f = export_dir / META_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise TrtglmError(f"{f}: not valid JSON ({e})") from None


def _sidecars(export_dir: Path, meta: dict | None) -> list[Path]:
    names = [META_FILE, *(meta or {}).get("files", {}).get("sidecars", [])] if meta else []
    return [export_dir / n for n in names if (export_dir / n).is_file()]
