"""Build recipes: the schema is code (pydantic), the YAML is data.

Precedence: built-in defaults < recipe file < command-line flags. Unknown keys and bad values are
errors naming the file, the field and, for a misspelt key, the closest known one.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import TrtglmError, field_path
from .memory import parse_size

TARGETS = ("sm75", "sm80", "sm86", "sm89", "sm90", "sm100", "sm120", "sm121")  # every compute capability known
FusionName = Literal["rms_norm", "qkv", "rotary", "rotary_keys", "rotary_keys_folded", "attention"]
FUSIONS: tuple[str, ...] = typing.get_args(FusionName)
# Keys: rotary_keys rotates them with RotaryEmbedding, which TensorRT-RTX cannot build feeding the KV cache into a
# fused Attention (fusion/rotary.py); rotary_keys_folded folds their rotation into the projection (fusion/key_fold.py)
DEFAULT_FUSIONS = ("rms_norm", "qkv", "rotary", "rotary_keys_folded", "attention")
DTYPES = ("fp32", "fp16", "bf16", "int8", "int4", "fp8")


class RecipeError(TrtglmError):
    exit_code = 2


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    name: str | None = Field(None, description="a name for the model the recipe is meant for")
    source: str | None = Field(None, description="checkpoint directory or hub id the recipe is meant for")


class FusionSection(_Section):
    fusions: tuple[FusionName, ...] = Field(DEFAULT_FUSIONS, description="the rewrite rules to run")
    strict: bool = Field(True, description="fail unless every rule reaches the count the model must reach (per layer)")


class QuantizationSection(_Section):
    block_size: int = Field(128, gt=0, description="int4: weights per scale, along the input dimension")
    lm_head: bool = Field(False, description="quantize the output projection too (int8, int4, fp8)")


class PrecisionSection(_Section):
    dtype: Literal[DTYPES] | None = Field(  # type: ignore[valid-type]
        None, description="the build's precision (default: the export's dtype); conversions start from fp32")
    fp32_ops: tuple[str, ...] = Field(
        ("Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax"),
        description="op types kept in fp32 in half graphs: the reductions of unfused norms and the softmax of "
                    "unfused attention (fused RMSNormalization and Attention reduce in fp32 anyway)")
    logits_dtype: Literal["fp32", "fp16"] = Field("fp32", description="dtype of the logits output")
    quantization: QuantizationSection = QuantizationSection()


class CalibrationSection(_Section):
    data: str | None = Field(None, description="JSONL with a \"text\" field, or plain text (default: the calibration "
                                                "text shipped in the package)")
    samples: int = Field(64, gt=0, description="token windows run as prefills")
    seq_len: int = Field(256, gt=0, description="tokens per window")
    method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="int8 activation ranges")


class ShapesSection(_Section):
    max_batch: int = Field(1, gt=0, description="rows of a batch")
    max_input_len: int = Field(512, gt=0, description="longest prompt (when not given: 512, or max_seq_len if "
                                                      "that is shorter)")
    max_seq_len: int = Field(2048, gt=0, description="prompt and generated tokens together (at most the export's)")
    opt_batch: int | None = Field(None, gt=0, description="the batch TensorRT tunes for")
    opt_input_len: int | None = Field(None, gt=0, description="the prompt length TensorRT tunes for")
    profiles: Literal["single", "split"] = Field(
        "single", description="single: one optimization profile for prefill and decode; split: one each "
                              "(the engine then holds the weights twice)")
    logits: Literal["all", "last"] = Field(
        "last", description="all: logits [batch, sequence, vocab] (perplexity, `trtglm eval`); last: "
                            "[batch, 1, vocab], the lm_head on the last position only (generation)")
    # Static is not the default: in one profile TensorRT-RTX runs the same kernels for both, and a static decode
    # step then repeats every slot's K/V for the attention; with `profiles: split` it decodes in the fewest kernels
    kv_cache: Literal["dynamic", "static"] = Field(
        "dynamic", description="dynamic: past in, past+new out (a copy each step); static: fixed "
                               "[batch, kv_heads, max_seq_len, head_dim] buffers updated in place")

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
    backend: Literal["auto", "tensorrt", "tensorrt_rtx"] = Field(
        "auto", description="the TensorRT module (auto: tensorrt_rtx, else tensorrt)")
    targets: tuple[str, ...] = Field(("sm89",), description="compute capabilities to build for (TensorRT-RTX: "
                                                             "several in one engine)")
    optimization_level: int = Field(3, ge=0, le=5, description="TensorRT's builder optimization level")
    workspace_mb: int | None = Field(None, gt=0, description="TensorRT's workspace memory pool limit")
    tactic_shared_memory_kb: int | None = Field(None, gt=0, description="shared memory per tactic")
    timing_cache: bool = Field(True, description="keep TensorRT's timing cache in the cache directory "
                                                 "(a no-op in TensorRT-RTX)")
    tiling_level: Literal["none", "fast", "moderate", "full"] = Field("none", description="L2 tiling effort")
    max_aux_streams: int | None = Field(None, ge=0, description="auxiliary streams TensorRT may use")
    weight_streaming: bool = Field(False, description="build a weight-streaming engine")
    attention: Literal["auto", "layer", "decomposed", "grouped"] = Field(
        "auto", description="the form TensorRT gets each Attention op in: layer = the op (IAttention); decomposed ="
                            " MatMul-Softmax-MatMul with K/V repeated together; grouped = each KV head's query "
                            "heads as extra query rows; auto = decomposed for one profile, layer for split")
    profiling_verbosity: Literal["none", "layer_names_only", "detailed"] = Field(
        "detailed", description="detail of the build log (detailed gives the kernel list in layers.json)")
    max_memory: str | None = Field(None, description="the memory the build may use (12G, 800M): a model whose "
                                                     "engine build needs more is built in stages of consecutive "
                                                     "layers, one engine each (default: the memory available)")

    @field_validator("max_memory", mode="before")
    @classmethod
    def _max_memory(cls, value):
        if value is None:
            return None
        parse_size(value)
        return str(value).strip()

    @property
    def max_memory_bytes(self) -> int | None:
        return parse_size(self.max_memory) if self.max_memory else None

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value):
        if not isinstance(value, (str, list, tuple)):
            raise ValueError(f"a list of targets such as [sm86, sm89], not {value!r}")
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

    max_ppl_delta: float | None = Field(None, ge=0, description="relative perplexity increase allowed "
                                                                 "(default: the precision's goal)")
    min_next_token_agreement: float | None = Field(None, ge=0, le=1, description="share of equal greedy tokens")
    min_logits_cosine: float | None = Field(None, ge=0, le=1, description="mean cosine of the logits")
    gate: bool = Field(False, description="`trtglm build` evaluates the result and publishes nothing when it is "
                                          "out of bounds")
    data: str | None = Field(None, description="held-out text (default: the eval split shipped in the package)")
    samples: int = Field(16, gt=0, description="windows evaluated")
    seq_len: int = Field(256, gt=0, description="tokens per window")

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
        except UnicodeDecodeError:
            raise RecipeError(f"{path}: not text (a recipe is UTF-8 YAML)") from None
        except (IsADirectoryError, PermissionError) as e:
            raise RecipeError(f"{path}: cannot be read ({e.strerror})") from None
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
        where = field_path(err["loc"])
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


def recipe_field(path: str):
    """The pydantic field at `section.name` (or `section.sub.name`)."""
    model: type[BaseModel] = Recipe
    *parents, name = path.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    return model.model_fields[name]


def field_paths(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every leaf field of the recipe schema as `section.name`."""
    out = []
    for name, field in (model or Recipe).model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += field_paths(field.annotation, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def reference() -> str:
    """Every recipe field as Markdown tables, one per section: name, type, default, what it does."""
    out = []
    for section, field in Recipe.model_fields.items():
        out += [f"### `{section}`", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        out += _rows(field.annotation, "")
        out.append("")
    return "\n".join(out)


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            rows += _rows(field.annotation, f"{prefix}{name}.")
            continue
        kind = _type_name(field.annotation)
        default = field.default.model_dump() if isinstance(field.default, BaseModel) else field.default
        if isinstance(default, tuple):
            default = list(default)
        limits = ", ".join(f"{symbol} {getattr(m, key)}" for m in field.metadata
                           for key, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                           if getattr(m, key, None) is not None)
        meaning = (field.description or "") + (f" ({limits})" if limits else "")
        rows.append(f"| `{prefix}{name}` | {kind} | `{default}` | {meaning} |".replace("`None`", "none"))
    return rows


def _type_name(annotation) -> str:
    """A type as a reader says it: `fp32 / fp16`, `list of str`, `int or none`."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " / ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (" or none" if type(None) in args else "")
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    return getattr(annotation, "__name__", str(annotation))
