"""Atomic output directories: build in a hidden sibling, rename into place at the end.

An interrupted run leaves no OUT_DIR (at most a hidden `.OUT_DIR.tmp-*` sibling, removed on any
Python-level exit); an existing OUT_DIR is replaced only with force=True.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputExists, TrtglmError


def save_graph(model, onnx_path: Path) -> None:
    """Write `model` (onnx-ir) over `onnx_path` through a sibling file; its untouched weights stay references
    into the same external data file, which is not rewritten."""
    import onnx_ir as ir

    tmp = onnx_path.with_name(onnx_path.name + ".partial")
    ir.save(model, tmp)
    tmp.replace(onnx_path)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False):
    out = Path(out).absolute()
    if out.exists() and not force:
        raise OutputExists(out)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise TrtglmError(f"cannot write to {parent}: {e.strerror or e}") from None
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
