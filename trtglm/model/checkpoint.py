"""Open a GLM checkpoint: resolve the directory, read config.json, index safetensors lazily.

Nothing is loaded until a tensor is asked for; tensors come from memory-mapped files one at a
time, so the export never holds the model twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import CheckpointError
from .config import GlmConfig, normalize
from .weights import IGNORED_SUFFIXES, WeightSpec, stacked_as_stored, weight_specs

# Files later stages need besides the weights: copied into every export.
SIDECAR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)

_ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Checkpoint:
    path: Path
    source: str  # what the user passed: a directory or a hub id
    raw_config: dict[str, Any]
    config: GlmConfig
    tensors: dict[str, TensorInfo]
    specs: dict[str, WeightSpec]
    skipped: list[str] = dataclasses.field(default_factory=list)  # tensors not part of the decoder (MTP layers)

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def sidecar_files(self) -> list[Path]:
        return [self.path / n for n in SIDECAR_FILES if (self.path / n).is_file()]

    def load(self, name: str):
        """One tensor as a torch tensor, copied out of the memory-mapped file.

        The file is mapped for this one read only: pages of a mapping that stays open count as
        resident memory, which would add the whole checkpoint to the export's footprint.
        """
        from safetensors import safe_open

        with safe_open(str(self.tensors[name].file), framework="pt") as handle:
            return handle.get_tensor(name)

    def load_weight(self, spec: WeightSpec):
        """A weight as its spec describes it (checkpoint layout, dtype as stored), assembled from its parts."""
        import torch

        if not spec.parts:
            return self.load(spec.name)
        groups = [torch.cat([self.load(n) for n in group]) if len(group) > 1 else self.load(group[0])
                  for group in spec.parts]
        return torch.stack(groups) if spec.stacked else groups[0]

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s.shape) for role, s in self.specs.items()
                   if not (role == "lm_head" and self.config.tie_word_embeddings))

    @property
    def num_active_parameters(self) -> int:
        """Parameters a token goes through: of the routed experts only the top-k (the whole model if dense)."""
        m = self.config.moe
        if m is None:
            return self.num_parameters
        routed = sum(math.prod(s.shape) for s in self.specs.values() if s.role.endswith(("experts_gate_up",
                                                                                         "experts_down")))
        return self.num_parameters - routed + routed * m.top_k // m.num_experts



def open_checkpoint(model: str | os.PathLike) -> Checkpoint:
    path = resolve(str(model))
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    config = normalize(raw)
    tensors = _index(path)
    specs = {role: stacked_as_stored(s) if s.stacked and s.name in tensors else s
             for role, s in weight_specs(config).items()}
    skipped = _beyond_decoder(config, tensors)
    _check_tensors(path, config, {n: t for n, t in tensors.items() if n not in skipped}, specs)
    return Checkpoint(path, str(model), raw, config, tensors, specs, skipped)


def _beyond_decoder(config: GlmConfig, tensors: dict[str, TensorInfo]) -> list[str]:
    """The tensors of multi-token-prediction layers (numbered after the decoder's), which the decoder does not
    use."""
    if not config.mtp_layers:
        return []
    mtp = range(config.num_layers, config.num_layers + config.mtp_layers)
    return sorted(n for n in tensors if (m := re.match(r"model\.layers\.(\d+)\.", n)) and int(m.group(1)) in mtp)


def resolve(model: str) -> Path:
    """A local directory as is; anything else that looks like `org/name` from the hub cache or network."""
    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{local}: not a directory")
        return local.resolve()
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise CheckpointError(f"{model}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:  # network errors, missing repo, offline mode: all one message
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{model}: not a local directory and could not be downloaded from the hub ({reason})",
            hint="download it on a machine with network access and pass the local directory",
        ) from None


def _index(path: Path) -> dict[str, TensorInfo]:
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: malformed index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and "/" not in f and f not in ("", "..")
                                                       for f in weight_map.values()):
            raise CheckpointError(f"{index_file}: malformed index (weight_map must map tensor names to shard files "
                                  "in the checkpoint directory)")
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index_file}: shard {f.name!r} is missing")
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not read)")
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, (dtype, shape) in read_header(f).items():
            tensors[name] = TensorInfo(f, dtype, shape)
    return tensors


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor names, dtypes and shapes from a safetensors header; checks the file is complete."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated or not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise CheckpointError(f"{file}: corrupt safetensors header (length {n}, file {size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    out, end = {}, 0
    for name, meta in header.items():
        dtype, shape, begin, stop = _tensor_entry(file, name, meta)
        if dtype in _ST_DTYPES and stop - begin != math.prod(shape) * _ST_DTYPES[dtype]:
            raise CheckpointError(f"{file}: tensor {name} has {stop - begin} bytes for shape {list(shape)}")
        end = max(end, stop)
        out[name] = (dtype, shape)
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: truncated ({size} bytes, header describes {8 + n + end})")
    return out


def _tensor_entry(file: Path, name: str, meta) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, stop) of one header entry, each checked for its type and range."""
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    ok = isinstance(meta, dict) and isinstance(meta.get("dtype"), str) and isinstance(meta.get("shape"), list) \
        and all(whole(d) for d in meta["shape"]) and isinstance(meta.get("data_offsets"), list) \
        and len(meta["data_offsets"]) == 2 and all(whole(o) for o in meta["data_offsets"]) \
        and meta["data_offsets"][0] <= meta["data_offsets"][1]
    if not ok:
        raise CheckpointError(f"{file}: corrupt safetensors header entry for {name!r} (needs dtype, a shape of "
                              f"non-negative sizes and two ordered data_offsets)")
    return meta["dtype"], tuple(meta["shape"]), *meta["data_offsets"]


def _check_tensors(path: Path, config: GlmConfig, tensors: dict[str, TensorInfo], specs: dict[str, WeightSpec]):
    expected = {}  # checkpoint name -> the shape it must have
    for role, s in specs.items():
        if not (role == "lm_head" and config.tie_word_embeddings):
            expected.update(s.stored())
    problems = []
    missing = [n for n in expected if n not in tensors]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
    unexpected = [n for n in tensors if n not in expected and not n.endswith(IGNORED_SUFFIXES)
                  and not (config.tie_word_embeddings and n == specs["lm_head"].name)]
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_names(unexpected)}")
    misshaped = [f"{n} is {list(tensors[n].shape)}, expected {list(shape)}"
                 for n, shape in expected.items() if n in tensors and tensors[n].shape != shape]
    if misshaped:
        problems.append("misshaped: " + "; ".join(misshaped[:5]) + (" ..." if len(misshaped) > 5 else ""))
    bad_dtype = [n for n in expected if n in tensors and tensors[n].dtype not in ("F32", "F16", "BF16")]
    if bad_dtype:
        problems.append(f"not floating point: {_names(bad_dtype)}")
    if problems:
        raise CheckpointError(f"{path} does not match its config.json ({config.family}): " + "; ".join(problems))


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
