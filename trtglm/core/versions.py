"""What made an artifact: the versions of trtglm and of the libraries it used, and a digest of trtglm's code."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

from .. import __version__


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"trtglm": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime-gpu", "onnxruntime",
                "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def source_digest() -> str:
    """sha256 of trtglm's own code: a build from changed code (between releases, in CI off main) is not a hit for
    an engine the old code made."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent  # the trtglm package
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()
