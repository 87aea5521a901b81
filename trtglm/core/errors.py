"""The errors a user can cause. The CLI turns each into one line and a non-zero exit."""

from __future__ import annotations


class TrtglmError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in trtglm."""

    exit_code = 1
    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class CheckpointError(TrtglmError):
    """The checkpoint is missing, malformed, or does not match its config."""


class UnsupportedCheckpoint(CheckpointError):
    def __init__(self, what: str, supported: list[str]):
        super().__init__(f"unsupported checkpoint: {what}; supported families: {', '.join(supported)}")


class OutputExists(TrtglmError):
    def __init__(self, path):
        super().__init__(f"output {path} already exists", hint="pass --force to replace it")


class ValidationFailed(TrtglmError):
    """The exported graph does not reproduce the reference within tolerance."""


class UsageError(TrtglmError):
    """An option value that cannot work (bad opset, impossible length, ...)."""

    exit_code = 2


def field_path(loc) -> str:
    """A pydantic error location as `section.field`, each part quoted if it is not printable: one line always."""
    return ".".join(str(p) if str(p).isprintable() else repr(str(p)) for p in loc) or "(top level)"
