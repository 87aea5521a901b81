"""The build directory, `trtglm build`'s output: its file names, manifest.json (read once) and its hashes.

    BUILD_DIR/  model.engine  model.onnx(+.data)  [engine.onnx]  manifest.json  layers.json  build.log
                export.json  tokenizer files
    a staged build: BUILD_DIR/stages/NN/ each with its own model.onnx(+.data) [model.engine ...] instead
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from ..core.errors import TrtglmError
from ..core.files import check_sha256, read_json_object
from ..core.schemas import FORMAT_VERSION, Manifest, check

MANIFEST_VERSION = FORMAT_VERSION
MANIFEST_FILE, ENGINE_FILE, LAYERS_FILE, LOG_FILE = "manifest.json", "model.engine", "layers.json", "build.log"
ENGINE_ONNX_FILE = "engine.onnx"  # the graph the engine is built from, where it is not model.onnx (engine_graph.py)
ONNX_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
STAGES_DIR = "stages"  # a staged build's stage directories (engine/staged_build.py)


class BuildDir:
    """A `trtglm build` directory; `manifest` is read once and checked to be a JSON object."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.onnx, self.data = self.path / ONNX_FILE, self.path / DATA_FILE
        self.engine, self.engine_onnx = self.path / ENGINE_FILE, self.path / ENGINE_ONNX_FILE
        self.manifest_file, self.layers_file = self.path / MANIFEST_FILE, self.path / LAYERS_FILE

    @staticmethod
    def is_build(path: str | Path) -> bool:
        return (Path(path) / MANIFEST_FILE).is_file()

    @cached_property
    def manifest(self) -> dict:
        if not self.manifest_file.is_file():
            raise TrtglmError(f"{self.path}: no {MANIFEST_FILE} (not a `trtglm build` directory)")
        return check(Manifest, read_json_object(self.manifest_file), str(self.manifest_file))

    @property
    def max_seq_len(self) -> int:
        return int(self.manifest["max_seq_len"])

    @property
    def shapes(self) -> dict:
        """The resolved recipe's shapes section (logits, kv_cache, ...)."""
        return self.manifest.get("recipe", {}).get("resolved", {}).get("shapes", {})

    def layers(self) -> list[dict] | None:
        """The engine's layers (a staged build's: every stage's, in order); None without an engine."""
        files = [d / LAYERS_FILE for d in self.stages] or [self.layers_file]
        if not all(f.is_file() for f in files):
            return None
        return [layer for f in files for layer in json.loads(f.read_text())["engine_layers"]]

    @property
    def packed(self) -> str | None:
        """What a pack of a build is for (`trtglm pack`: gpu, cpu), None for a whole build directory."""
        return (self.manifest.get("packed") or {}).get("for")

    @property
    def stages(self) -> list[Path]:
        """A staged build's stage directories in order (empty: the whole graph in one)."""
        return [self.path / STAGES_DIR / s["dir"] for s in self.manifest.get("stages") or []]

    def check_hashes(self) -> list[str]:
        """Every file the manifest lists, against its sha256 (empty: intact)."""
        return check_sha256(self.path, self.manifest.get("files", {}).get("sha256", {}), "the manifest")
