"""A simulated GPU for the engine runner's tests: stand-ins for `pycuda` (cuda.py) and for the runtime of
`tensorrt_rtx` / `tensorrt` (tensorrt.py), installed over the real modules for one test."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

from . import cuda, tensorrt


def install(monkeypatch, build_dir: Path, module: str = "tensorrt_rtx", gpu: str = "sm89"):
    """The simulated TensorRT module named `module` (at the version `build_dir` was built with) and pycuda, a
    GPU of compute capability `gpu`, and `build_dir`'s engine known to the simulated runtime."""
    version = json.loads((Path(build_dir) / "manifest.json").read_text())["backend"]["version"]
    trt = tensorrt.module(module, version)
    pycuda = types.ModuleType("pycuda")
    pycuda.driver, pycuda.autoinit = cuda, types.ModuleType("pycuda.autoinit")
    for name, value in ((module, trt), ("pycuda", pycuda), ("pycuda.driver", cuda),
                        ("pycuda.autoinit", pycuda.autoinit)):
        monkeypatch.setitem(sys.modules, name, value)
    for where in ("trtglm.runtime.trt", "trtglm.engine.inspect"):
        monkeypatch.setattr(f"{where}.gpu_compute_capability", lambda: gpu)
    tensorrt.register(build_dir)
    return trt
