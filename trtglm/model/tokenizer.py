"""Text in and out of a build: its tokenizer, chat template and stop tokens (files copied from the checkpoint)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import TrtglmError


@dataclass
class Text:
    tokenizer: object
    stop_ids: frozenset[int]
    pad_id: int

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise TrtglmError("this model's tokenizer has no chat template (tokenizer_config.json chat_template)")
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.stop_ids], skip_special_tokens=True)


def load_text(build_dir: str | Path) -> Text:
    """The fast tokenizer (tokenizer.json) of a build. Remote-code tokenizers are never executed."""
    from transformers import PreTrainedTokenizerFast

    build_dir = Path(build_dir)
    if not (build_dir / "tokenizer.json").is_file():
        raise TrtglmError(f"{build_dir}: no tokenizer.json (checkpoints whose tokenizer is remote code, such as "
                          "glm-4-9b-chat's tiktoken file, are not loaded)",
                          hint="export a checkpoint with a fast tokenizer (tokenizer.json), such as the -hf one")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(build_dir))
    except Exception as e:  # noqa: BLE001 - the tokenizers library's own errors, of many kinds: one line
        raise TrtglmError(f"{build_dir / 'tokenizer.json'}: cannot be loaded ({str(e).splitlines()[0][:200]})") from None
    gen = build_dir / "generation_config.json"
    try:
        config = json.loads(gen.read_text()) if gen.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrtglmError(f"{gen}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise TrtglmError(f"{gen}: expected a JSON object")
    for key in ("eos_token_id", "pad_token_id"):
        value = config.get(key)
        if value is not None and not (_token_id(value) or isinstance(value, list) and all(map(_token_id, value))):
            raise TrtglmError(f"{gen}: {key} must be a token id or a list of them, got {value!r}")
    eos = config.get("eos_token_id", tokenizer.eos_token_id)
    stop = {eos} if isinstance(eos, int) else set(eos or [])
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    pad = config.get("pad_token_id", tokenizer.pad_token_id)
    pad = pad if isinstance(pad, int) else (min(stop) if stop else 0)
    return Text(tokenizer, frozenset(stop), pad)


def _token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
