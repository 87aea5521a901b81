"""Build recipes: the schema is code (pydantic), the YAML is data.

Precedence: built-in defaults < recipe file < command-line flags. Unknown keys and bad values are
errors naming the file, the field and, for a misspelt key, the closest known one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import TrtglmError

TARGETS = ("sm75", "sm80", "sm86", "sm89", "sm90", "sm100", "sm120", "sm121")
DTYPES = ("fp32", "fp16", "bf16", "int8", "int4", "fp8")


class RecipeError(TrtglmError):
    exit_code = 2


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    name: str | None = None
    source: str | None = Field(None, description="checkpoint directory or hub id the recipe is meant for")


class FusionSection(_Section):
    fusions: tuple[Literal["rms_norm", "qkv", "rotary", "rotary_keys", "rotary_keys_folded", "attention"], ...] = (
        "rms_norm", "qkv", "rotary", "rotary_keys_folded", "attention")
    strict: bool = True


class QuantizationSection(_Section):
    block_size: int = Field(128, gt=0)  # int4: weights per scale, along the input dimension
    lm_head: bool = False  # quantize the output projection too (int8/int4/fp8)


class PrecisionSection(_Section):
    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]  # None: as exported
    # op types computed in fp32 in fp16/bf16 graphs: the reductions of unfused norms and the softmax of unfused
    # attention (as the fp16 export computes them); the fused RMSNormalization/Attention reduce in fp32 anyway
    fp32_ops: tuple[str, ...] = ("Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax")
    logits_dtype: Literal["fp32", "fp16"] = "fp32"
    quantization: QuantizationSection = QuantizationSection()


class CalibrationSection(_Section):
    data: str | None = None
    samples: int = Field(64, gt=0)
    seq_len: int = Field(256, gt=0)
    method: Literal["minmax", "entropy", "percentile"] = "minmax"


class ShapesSection(_Section):
    max_batch: int = Field(1, gt=0)
    max_input_len: int = Field(512, gt=0)  # when not given: 512, or max_seq_len if that is shorter
    max_seq_len: int = Field(2048, gt=0)
    opt_batch: int | None = Field(None, gt=0)
    opt_input_len: int | None = Field(None, gt=0)
    # single: one profile for prefill and decode; split: one each (TensorRT-RTX then stores the weights twice)
    profiles: Literal["single", "split"] = "single"
    # all: logits [batch, sequence, vocab] (perplexity, `trtglm eval`); last: [batch, 1, vocab], the lm_head on the
    # last position only (generation: a prefill computes one row of it; last_logits.py)
    logits: Literal["all", "last"] = "last"
    # dynamic: past [B,KV,P,D] in, present [B,KV,P+S,D] out (a copy each step); static: fixed [B,KV,max_seq_len,D]
    # buffers updated in place by TensorScatter, TensorRT's KV-cache-update layer (static_cache.py). Static is not
    # the default: in one profile (the default) TensorRT-RTX runs the same kernels for both, and a static decode
    # step then repeats every slot's K/V for the attention; with `profiles: split` static decodes in the fewest
    # kernels (bench/fusion.py)
    kv_cache: Literal["dynamic", "static"] = "dynamic"

    @model_validator(mode="before")
    @classmethod
    def _input_fits(cls, data):
        if isinstance(data, dict) and data.get("max_input_len") is None and isinstance(data.get("max_seq_len"), int):
            data = {**data, "max_input_len": min(512, data["max_seq_len"])}
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_input_len > self.max_seq_len:
            raise ValueError(f"max_input_len {self.max_input_len} exceeds max_seq_len {self.max_seq_len}")
        if self.opt_batch is not None and self.opt_batch > self.max_batch:
            raise ValueError(f"opt_batch {self.opt_batch} exceeds max_batch {self.max_batch}")
        if self.opt_input_len is not None and self.opt_input_len > self.max_input_len:
            raise ValueError(f"opt_input_len {self.opt_input_len} exceeds max_input_len {self.max_input_len}")
        return self


class BuilderSection(_Section):
    backend: Literal["auto", "tensorrt", "tensorrt_rtx"] = "auto"
    targets: tuple[str, ...] = ("sm89",)
    optimization_level: int = Field(3, ge=0, le=5)
    workspace_mb: int | None = Field(None, gt=0)
    tactic_shared_memory_kb: int | None = Field(None, gt=0)
    timing_cache: bool = True
    tiling_level: Literal["none", "fast", "moderate", "full"] = "none"
    max_aux_streams: int | None = Field(None, ge=0)
    weight_streaming: bool = False
    # the form TensorRT gets each fused Attention op in (engine_graph.py): layer = the op as is (TensorRT's
    # IAttention), decomposed = MatMul-Softmax-MatMul with K/V repeated together, which Myelin fuses into its own
    # attention kernel with fewer kernels around it in one profile; grouped = the same with each KV head's query
    # heads as extra query rows (no repeated K/V copy, one kernel more); auto = decomposed for one profile, layer
    # for split
    attention: Literal["auto", "layer", "decomposed", "grouped"] = "auto"
    profiling_verbosity: Literal["none", "layer_names_only", "detailed"] = "detailed"

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value):
        items = value.split(",") if isinstance(value, str) else list(value)
        out = tuple(str(t).strip().lower() for t in items if str(t).strip())
        for t in out:
            if t not in TARGETS:
                raise ValueError(f"unknown target {t!r} (known: {', '.join(TARGETS)})")
        if not out:
            raise ValueError("at least one target is needed")
        return out


# Accuracy goals per precision against the fp32 reference: perplexity delta, next-token agreement, logits cosine.
ACCURACY_GOALS = {"fp32": (0.001, 0.995, 0.9999), "fp16": (0.005, 0.98, 0.999), "bf16": (0.005, 0.98, 0.999),
                  "int8": (0.03, 0.90, 0.99), "fp8": (0.03, 0.80, 0.99), "int4": (0.10, 0.85, 0.99)}


class AccuracySection(_Section):
    """Limits left out take the precision's goals (ACCURACY_GOALS) when the build resolves its dtype."""

    max_ppl_delta: float | None = Field(None, ge=0)
    min_next_token_agreement: float | None = Field(None, ge=0, le=1)
    min_logits_cosine: float | None = Field(None, ge=0, le=1)
    gate: bool = False  # `trtglm build` evaluates the result and publishes nothing when it is out of bounds
    data: str | None = None  # held-out text (default: the shipped eval split)
    samples: int = Field(16, gt=0)
    seq_len: int = Field(256, gt=0)

    def for_dtype(self, dtype: str) -> "AccuracySection":
        goals = dict(zip(("max_ppl_delta", "min_next_token_agreement", "min_logits_cosine"), ACCURACY_GOALS[dtype]))
        return self.model_copy(update={k: v for k, v in goals.items() if getattr(self, k) is None})


class Recipe(_Section):
    model: ModelSection = ModelSection()
    fusion: FusionSection = FusionSection()
    precision: PrecisionSection = PrecisionSection()
    calibration: CalibrationSection = CalibrationSection()
    shapes: ShapesSection = ShapesSection()
    builder: BuilderSection = BuilderSection()
    accuracy: AccuracySection = AccuracySection()

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_recipe(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Recipe:
    """Defaults, then the YAML file, then `overrides` ({section: {field: value}}, None values ignored)."""
    data: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        import yaml

        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise RecipeError(f"{path}: no such recipe file") from None
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    for section, fields in (overrides or {}).items():
        fields = {k: v for k, v in fields.items() if v is not None}
        if fields:
            base = data.get(section) or {}
            if not isinstance(base, dict):
                raise RecipeError(f"{source}: {section}: expected a mapping")
            data[section] = {**base, **fields}
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_explain(source, e)) from None


def _explain(source: str, error: ValidationError) -> str:
    problems = []
    for err in error.errors():
        loc = [str(p) for p in err["loc"]]
        where = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _known_fields(loc[:-1])
            guess = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else f" (known: {', '.join(known)})"
            problems.append(f"{where}: unknown field{hint}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {msg}")
    return f"{source}: " + "; ".join(problems)


def _known_fields(path: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return list(model.model_fields)
