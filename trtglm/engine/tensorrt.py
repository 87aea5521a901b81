"""The TensorRT module (`tensorrt_rtx` or `tensorrt`, one code path), the targets each can build, and the GPU here."""

from __future__ import annotations

import shutil
import subprocess

from ..core.errors import TrtglmError
from ..core.recipe import TARGETS

BACKENDS = ("tensorrt_rtx", "tensorrt")
# TensorRT-RTX builds for the RTX generations: every known target but the data-center sm90 and sm100
RTX_TARGETS = tuple(t for t in TARGETS if t not in ("sm90", "sm100"))


def import_backend(name: str = "auto"):
    """The TensorRT module: tensorrt_rtx or tensorrt, whichever is installed (or the one asked for)."""
    import importlib

    for module in (BACKENDS if name == "auto" else (name,)):
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    raise TrtglmError(f"no TensorRT module ({'/'.join(BACKENDS) if name == 'auto' else name}) is installed",
                      hint="pip install 'trtglm[rtx]' (TensorRT for RTX, builds on a CPU) or 'trtglm[trt]', "
                           "or pass --onnx-only")


def version_mismatch(trt, backend: dict) -> str | None:
    """Why `trt` cannot load an engine its manifest says `backend` ({name, version}) built (None: it can)."""
    if backend.get("version") and trt.__version__ != backend["version"]:
        return f"the engine was built with {backend['name']} {backend['version']}, this machine has {trt.__version__}"
    return None


# The full TensorRT's first release with the KV-cache-update layer a static cache is built into
KV_CACHE_UPDATE_SINCE = (10, 15)


def check_features(trt, kv_cache: str) -> None:
    """Refuse, before any work, a graph form the installed TensorRT cannot build."""
    if trt.__name__ != "tensorrt" or kv_cache != "static":
        return
    version = tuple(int(x) for x in trt.__version__.split(".")[:2] if x.isdigit())
    if version < KV_CACHE_UPDATE_SINCE:
        since = ".".join(map(str, KV_CACHE_UPDATE_SINCE))
        raise TrtglmError(f"a static KV cache needs TensorRT's KV-cache-update layer, in tensorrt {since} and newer; "
                          f"this is {trt.__version__}", hint=f"pip install 'tensorrt>={since}', or --kv-cache dynamic")


def check_targets(targets: tuple[str, ...], dtype: str, backend: str) -> None:
    """Refuse, before any work, a precision or target the backend cannot build."""
    numbers = {t: int(t[2:]) for t in targets}
    if backend == "tensorrt_rtx":
        bad = [t for t in targets if t not in RTX_TARGETS]
        if bad:
            raise TrtglmError(f"TensorRT-RTX cannot build for {', '.join(bad)} (it targets {', '.join(RTX_TARGETS)}; "
                              "no SM90/SM100 data-center GPUs)", hint="use the full TensorRT (trtglm[trt]) on that GPU")
    need = {"bf16": 80, "int4": 80, "fp8": 89}.get(dtype)
    too_old = [t for t, n in numbers.items() if need and n < need]
    if too_old:
        raise TrtglmError(f"{dtype} needs SM{need} or newer; {', '.join(too_old)} cannot run it")
    if dtype == "fp32" and "sm75" in targets:
        raise TrtglmError("sm75 has no fp32 GEMM in TensorRT: build fp16 for it")


def gpu_compute_capability() -> str | None:
    """'sm89' for the first GPU, or None without one (nvidia-smi, no CUDA import needed)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return "sm" + out[0].replace(".", "") if out else None
