"""The export directory, `trtglm export`'s output: its file names, export.json (read once) and its hashes.

    EXPORT_DIR/  model.onnx  model.onnx.data  export.json  tokenizer.json ... (the checkpoint's sidecar files)
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from ..core.errors import TrtglmError, UsageError
from ..core.files import check_sha256, read_json_object, sha256
from ..core.schemas import FORMAT_VERSION, ExportMeta, check  # noqa: F401 - the exporter writes it

ONNX_FILE, DATA_FILE, META_FILE = "model.onnx", "model.onnx.data", "export.json"


class ExportDir:
    """A `trtglm export` directory, or any directory with a model.onnx (then `meta` is None)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.onnx, self.data, self.meta_file = self.path / ONNX_FILE, self.path / DATA_FILE, self.path / META_FILE

    def require_graph(self) -> "ExportDir":
        if not self.onnx.is_file():
            raise TrtglmError(f"{self.path}: no {ONNX_FILE} (not a `trtglm export` directory)")
        return self

    @cached_property
    def meta(self) -> dict | None:
        """export.json, or None where there is none (a graph from another exporter)."""
        if not self.meta_file.is_file():
            return None
        return check(ExportMeta, read_json_object(self.meta_file), str(self.meta_file))

    @property
    def dtype(self) -> str | None:
        return (self.meta or {}).get("dtype")

    @property
    def data_bytes(self) -> int:
        return self.data.stat().st_size if self.data.is_file() else 0

    def sidecars(self) -> list[Path]:
        """export.json and the tokenizer / chat template / generation config files a build carries along."""
        if self.meta is None:
            return []
        names = [META_FILE, *self.meta.get("files", {}).get("sidecars", [])]
        return [self.path / n for n in names if (self.path / n).is_file()]

    def hashes(self) -> dict[str, str]:
        """sha256 of the graph and its weights: as export.json records them, or computed."""
        recorded = (self.meta or {}).get("files", {}).get("sha256")
        return recorded or {f.name: sha256(f) for f in (self.onnx, self.data) if f.is_file()}

    def verify(self) -> list[str]:
        """What does not match export.json's hashes (empty: intact)."""
        return check_sha256(self.path, (self.meta or {}).get("files", {}).get("sha256") or {}, META_FILE)

    def require_fp32_reference(self) -> "ExportDir":
        """The fp32 export accuracy is measured against (`eval`, and the gate inside `build`)."""
        hint = "pass --reference FP32_EXPORT_DIR (from `trtglm export ... --dtype fp32`)"
        if self.meta is None:
            raise UsageError(f"{self.path}: not a `trtglm export` directory (the fp32 reference)", hint=hint)
        if self.dtype != "fp32":
            raise UsageError(f"{self.path}: accuracy is measured against an fp32 export, and this is not one",
                             hint=hint)
        return self
