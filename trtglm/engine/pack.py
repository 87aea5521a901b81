"""`trtglm pack`: from a build directory, what one runtime needs, the weights once.

    BUILD_DIR ─ --for gpu ─> manifest, tokenizer, the engine(s) (every stage's)         the TensorRT runner
              └ --for cpu ─> manifest, tokenizer, the ONNX graph(s) and their weights     ONNX Runtime
A build directory holds the weights twice (in its ONNX graphs and in its engines) so that one directory runs
anywhere; a pack holds them once. Files are hard links where the file system allows (no copy). The pack's
manifest names what it is for (`packed`) and lists the hashes of the files it holds, so `verify` checks it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..core.errors import UsageError
from ..core.files import atomic_dir
from .directory import (
    DATA_FILE,
    ENGINE_FILE,
    ENGINE_ONNX_FILE,
    LAYERS_FILE,
    LOG_FILE,
    MANIFEST_FILE,
    ONNX_FILE,
    BuildDir,
)

# the build's own files and which pack keeps each; every other file (tokenizer, export.json) goes to both
KEPT = {"gpu": {ENGINE_FILE, LAYERS_FILE, LOG_FILE}, "cpu": {ONNX_FILE, DATA_FILE}}
BUILT = {ONNX_FILE, DATA_FILE, ENGINE_FILE, ENGINE_ONNX_FILE, LAYERS_FILE, LOG_FILE, MANIFEST_FILE}
RUNS_ON = {"gpu": "the TensorRT engine(s), on a GPU the build targets (`trtglm run --backend trt`)",
           "cpu": "ONNX Runtime, on the CPU or its CUDA provider (`trtglm run --backend ort`)"}


def pack(build_dir: str | Path, out_dir: str | Path, target: str, force: bool = False) -> dict:
    """Write the pack of `build_dir` for `target` (gpu or cpu) to `out_dir`; returns its manifest."""
    if target not in KEPT:
        raise UsageError(f"unknown pack target {target!r}: gpu or cpu")
    build = BuildDir(build_dir)
    manifest = build.manifest
    if manifest.get("packed"):
        raise UsageError(f"{build.path} is itself packed for {manifest['packed']['for']}: pack the full build")
    if target == "gpu" and manifest.get("stage") != "engine":
        raise UsageError(f"{build.path} has no engine (it was built with --onnx-only): nothing to pack for a GPU")
    problems = build.check_hashes()
    if problems:
        raise UsageError(f"{build.path}: " + "; ".join(problems), hint="rebuild it (trtglm build --force)")
    hashes = manifest.get("files", {}).get("sha256", {})
    kept = {name: digest for name, digest in hashes.items() if Path(name).name in KEPT[target]}
    out = dict(manifest) | {"files": {"sha256": kept},
                            "packed": {"for": target, "runs_on": RUNS_ON[target],
                                       "from": str(build.path.resolve())}}
    with atomic_dir(out_dir, force=force) as tmp:
        for d in [build.path, *build.stages]:
            for f in sorted(d.iterdir()):
                # the tokenizer and export.json go to both packs; the build's own files to the pack that uses them
                if f.is_file() and f.name != MANIFEST_FILE and (f.name not in BUILT or f.name in KEPT[target]):
                    _link(f, tmp / f.relative_to(build.path))
        (tmp / MANIFEST_FILE).write_text(json.dumps(out, indent=2) + "\n")
    return out


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
