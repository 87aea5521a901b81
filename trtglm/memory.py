"""Refuse work that cannot fit in the memory available now, before anything is written."""

from __future__ import annotations

from .errors import TrtglmError

BASE_BYTES = 600 << 20  # torch, transformers and onnxruntime themselves


def available_memory() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def require(need: float, what: str, hint: str, error: type[TrtglmError] = TrtglmError) -> None:
    """`what` needs about `need` bytes besides the libraries themselves; fail now if that is not available."""
    need += BASE_BYTES
    available = available_memory()
    if available is not None and need > available:
        raise error(f"{what} needs about {need / 2**30:.1f} GiB of memory but {available / 2**30:.1f} GiB is "
                    "available", hint=hint)
