"""Files trtglm writes: atomic output directories (built in a hidden sibling, renamed into place at the end),
content hashes, and the cache directory.

An interrupted run leaves no OUT_DIR (at most a hidden `.OUT_DIR.tmp-*` sibling, removed on any
Python-level exit); an existing OUT_DIR is replaced only with force=True.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputExists, TrtglmError


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


@contextlib.contextmanager
def atomic_file(path: Path):
    """A temporary sibling of `path` to write; renamed over `path` when the block succeeds, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (a manifest); one clear error otherwise."""
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrtglmError(f"{path}: corrupt, not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise TrtglmError(f"{path}: corrupt, not a JSON object")
    return value


def check_sha256(directory: Path, hashes: dict[str, str], recorded_in: str) -> list[str]:
    """The files of `directory` named in `hashes` that are missing or differ (empty: all intact)."""
    problems = []
    for name, digest in hashes.items():
        f = Path(directory) / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif sha256(f) != digest:
            problems.append(f"{name} does not match its sha256 in {recorded_in}")
    return problems


def cache_dir() -> Path:
    """trtglm's cache (engines, calibration ranges, timing caches): $XDG_CACHE_HOME/trtglm."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trtglm"
