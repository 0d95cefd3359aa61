"""Tokenizers: a byte-level one for the built-in presets (no files), and Hugging Face `tokenizer.json`
files through the `tokenizers` library, with the chat template of `tokenizer_config.json`."""

from __future__ import annotations

import json
from pathlib import Path

# Used when a model ships no chat template (the built-in presets): one line per role header.
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class Tokenizer:
    """What the engine needs of a tokenizer."""

    bos_token_id: int | None
    eos_token_id: int | None
    chat_template: str | None = None
    config: dict = {}  # the model's tokenizer_config.json, as read ({} for the byte tokenizer); never mutated

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`add_special_tokens=False`: the text's own tokens, no BOS (e.g. to tokenize a bad word)."""
        raise NotImplementedError

    def decode(self, token_ids: list[int]) -> str:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        import jinja2  # a dependency of torch

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template or SIMPLE_CHAT_TEMPLATE)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.special_token_text(self.bos_token_id),
            eos_token=self.special_token_text(self.eos_token_id),
        )

    def special_token_text(self, token_id: int | None) -> str:
        return ""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; then <bos>, <eos>, <pad>. Ids past those decode to nothing."""

    def __init__(self, bos_token_id: int = 256, eos_token_id: int = 257):
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.bos_token_id, *text.encode("utf-8")] if add_special_tokens else list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if 0 <= t < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = _Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = {}
        if (model_dir / "tokenizer_config.json").exists():
            config = json.loads((model_dir / "tokenizer_config.json").read_text())
        self.config = config
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default one
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        self.bos_token_id = self._token_id(config.get("bos_token"))
        self.eos_token_id = self._token_id(config.get("eos_token"))

    def _token_id(self, token) -> int | None:
        if isinstance(token, dict):  # older configs store AddedToken dicts
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)

    def special_token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self._tok.id_to_token(token_id) or "")


def load_tokenizer(model_dir: Path | None, bos_token_id: int | None, eos_token_id: int | None) -> Tokenizer | None:
    """The model directory's tokenizer.json; the byte tokenizer for presets; None when a directory has none."""
    if model_dir is None:
        return ByteTokenizer(bos_token_id if bos_token_id is not None else 256, eos_token_id if eos_token_id is not None else 257)
    if (model_dir / "tokenizer.json").exists():
        return HFTokenizer(model_dir)
    return None
