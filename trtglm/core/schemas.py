"""The fields of manifest.json and export.json that trtglm reads back, as pydantic models: a file edited by hand,
truncated or written by a newer trtglm is refused on reading with one line that names the field, not deep inside
whatever reads it later. Fields not listed here are kept as they are."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from .errors import TrtglmError, field_path
from .recipe import Recipe

FORMAT_VERSION = 1  # of both files; a newer one is refused with the version it has


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class TensorSpec(_Loose):
    name: StrictStr
    dtype: StrictStr
    shape: list[StrictInt | StrictStr]


class IOSpec(_Loose):
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)


class Files(_Loose):
    sha256: dict[StrictStr, StrictStr] = {}
    sidecars: list[StrictStr] = []


class Latent(_Loose):  # multi-head latent attention (glm4_moe_lite)
    q_lora_rank: StrictInt | None = Field(gt=0)
    kv_lora_rank: StrictInt = Field(gt=0)
    qk_rope_head_dim: StrictInt = Field(gt=0)


class ModelShape(_Loose):
    num_layers: StrictInt = Field(gt=0)
    vocab_size: StrictInt = Field(gt=0)
    qk_norm: StrictBool = False
    mla: Latent | None = None


class ExportMeta(_Loose):
    format_version: StrictInt = Field(1, ge=1, le=FORMAT_VERSION)
    family: Literal["glm", "glm4", "chatglm", "glm4_moe", "glm4_moe_lite"]
    dtype: Literal["fp32", "fp16", "bf16"]
    max_seq_len: StrictInt = Field(gt=0)
    config: ModelShape
    io: IOSpec
    files: Files = Files()


class Resolved(_Loose):
    resolved: Recipe


class Precision(_Loose):
    dtype: Literal["fp32", "fp16", "bf16", "int8", "int4", "fp8"]


class Backend(_Loose):
    name: Literal["tensorrt", "tensorrt_rtx"]
    version: StrictStr


class Fusion(_Loose):
    fused: dict[StrictStr, StrictInt]
    nodes_before: StrictInt = Field(gt=0)
    nodes_after: StrictInt = Field(ge=0)


class Stage(_Loose):
    index: StrictInt = Field(ge=0)
    layers: list[StrictInt] = Field(min_length=2, max_length=2)
    dir: str = Field(pattern=r"^[0-9]{2,}$")  # a directory under stages/, never a path elsewhere
    inputs: list[StrictStr] = Field(min_length=1)
    outputs: list[StrictStr] = Field(min_length=1)
    weight_bytes: StrictInt = Field(ge=0)
    io: IOSpec | None = None
    profiles: list[dict[StrictStr, list[list[StrictInt]]]] | None = None


class Packed(_Loose):
    for_: Literal["gpu", "cpu"] = Field(alias="for")


class Manifest(_Loose):
    format_version: StrictInt = Field(1, ge=1, le=FORMAT_VERSION)
    stage: Literal["onnx", "engine"]
    max_seq_len: StrictInt = Field(gt=0)
    recipe: Resolved
    precision: Precision
    fusion: Fusion
    io: IOSpec | None = None
    files: Files = Files()
    backend: Backend | None = None
    targets: list[StrictStr] | None = None
    profiles: list[dict[StrictStr, list[list[StrictInt]]]] | None = None
    stages: list[Stage] | None = None
    packed: Packed | None = None  # `trtglm pack`: the part of a build one runtime needs


def check(model: type[BaseModel], data: Any, where: str) -> dict:
    """`data` if it has the fields `model` describes; else one TrtglmError naming the first bad field."""
    try:
        model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = field_path(err["loc"])
        if field == "format_version" and isinstance(data, dict) and isinstance(data.get(field), int):
            raise TrtglmError(f"{where}: written by a newer trtglm (format {data[field]}; this one reads "
                              f"{FORMAT_VERSION})", hint="upgrade trtglm, or rebuild with this one") from None
        raise TrtglmError(f"{where}: {field}: {err['msg']} (got {_short(err.get('input'))})",
                          hint="the file was edited or damaged: write it again (trtglm export / build --force)") \
            from None
    return data


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
