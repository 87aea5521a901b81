"""Refuse work that cannot fit in the memory available now, before anything is written."""

from __future__ import annotations

import re

from .errors import TrtglmError

SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
BASE_BYTES = 600 << 20  # torch, transformers and onnxruntime themselves


def available_memory() -> int | None:
    """What this process may still allocate: the machine's available memory, or less where a cgroup (a
    container, a CI runner) limits it. None where neither can be read (not Linux)."""
    limits = [limit for limit in (_meminfo_available(), _cgroup_headroom()) if limit is not None]
    return min(limits) if limits else None


def _meminfo_available() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom(root: str = "/sys/fs/cgroup", cgroups: str = "/proc/self/cgroup") -> int | None:
    """The memory limit of this process's cgroup less what it uses (v2: memory.max, v1: memory.limit_in_bytes),
    None without a limit. Inside a container the cgroup's own files are at the root of the mount."""
    try:
        lines = [line.strip().split(":", 2) for line in open(cgroups)]
    except OSError:
        return None
    for hierarchy, controllers, path in lines:
        if hierarchy == "0" and not controllers:
            files, limit_file, used_file = [f"{root}{path.rstrip('/')}", root], "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            files, limit_file, used_file = [f"{root}/memory{path.rstrip('/')}", f"{root}/memory"], \
                "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        for directory in files:
            try:
                limit = open(f"{directory}/{limit_file}").read().strip()
                used = int(open(f"{directory}/{used_file}").read())
            except (OSError, ValueError):
                continue
            if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
                return None
            return max(0, int(limit) - used)
    return None


def require(need: float, what: str, hint: str, error: type[TrtglmError] = TrtglmError) -> None:
    """`what` needs about `need` bytes besides the libraries themselves; fail now if that is not available."""
    need += BASE_BYTES
    available = available_memory()
    if available is not None and need > available:
        raise error(f"{what} needs about {need / 2**30:.1f} GiB of memory but {available / 2**30:.1f} GiB is "
                    "available", hint=hint)


def parse_size(text: str | int) -> int:
    """Bytes from `12G`, `12GiB`, `800M`, `1.5T` or a number of bytes: K/M/G/T alone or with `iB` are powers of
    1024 (as `docker -m`), with `B` (`12GB`) powers of 1000. ValueError names what it could not read."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"a size such as 12G, not {text!r}")
    if isinstance(text, int):
        value, unit, suffix = text, "", None
    else:
        match = SIZE.match(text)
        if not match:
            raise ValueError(f"a size such as 12G, 12GiB or 800M, not {text!r}")
        value, unit, suffix = float(match.group(1)), match.group(2).lower(), (match.group(3) or "").lower()
    power = "kmgt".index(unit) + 1 if unit else 0
    size = int(value * ((1000 if suffix == "b" else 1024) ** power))
    if size <= 0:
        raise ValueError(f"a size above zero, not {text!r}")
    return size


def peak_rss() -> int | None:
    """This process's peak resident memory so far (VmHWM; None off Linux)."""
    try:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None

