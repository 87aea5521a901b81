"""The OpenAI API's request bodies as pydantic models (what trtglm serve accepts), and its error object.

Fields trtglm does not implement are refused with a clear message when set to anything but their default;
fields it does not know are ignored, as OpenAI's clients send newer ones.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

StrictInt = Annotated[int, Field(strict=True)]
TokenId = Annotated[int, Field(strict=True, ge=0)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampled(BaseModel):
    """What both endpoints share: the model, sampling, stopping and streaming."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=-1)  # 0 or -1: off
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    n: StrictInt = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=64)
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    logit_bias: dict | None = None
    best_of: StrictInt | None = None
    user: str | None = None

    @field_validator("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 stop strings, none empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        refused = {"presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                   "logit_bias": self.logit_bias, "best_of": self.best_of not in (None, 1),
                   "logprobs": self.logprobs not in (None, False, 0)}
        for name, value in refused.items():
            if value:
                raise ValueError(f"{name} is not supported by trtglm serve"
                                 + (" (repetition_penalty is)" if name.endswith("_penalty") else ""))
        return self


class CompletionRequest(Sampled):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool = False
    suffix: str | None = None
    max_tokens: StrictInt | None = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        """One clear complaint instead of one per member of the union."""
        def ids(x):
            return isinstance(x, list) and bool(x) and all(type(t) is int and t >= 0 for t in x)

        if isinstance(v, str) or ids(v):
            return v
        if isinstance(v, list) and v and len(v) <= 64 and (all(isinstance(p, str) for p in v) or all(map(ids, v))):
            return v
        raise ValueError("must be a string, a list of up to 64 strings, a list of token ids (integers >= 0), or a "
                         "list of up to 64 such lists, none empty")

    @model_validator(mode="after")
    def _refused(self):
        if self.echo:
            raise ValueError("echo is not supported by trtglm serve")
        if self.suffix:
            raise ValueError("suffix is not supported by trtglm serve")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
