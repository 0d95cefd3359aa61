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

CHAT_TEMPLATE_FILE = "chat_template.jinja"
# tokenizer_config.json's special tokens, which transformers hands every chat template by name.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """What the engine needs of a tokenizer."""

    bos_token_id: int | None
    eos_token_id: int | None
    chat_template: str | None = None
    config: dict = {}  # the model's tokenizer_config.json, as read ({} for the byte tokenizer); never mutated

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`add_special_tokens=False`: the text's own tokens, no BOS (e.g. to tokenize a bad word)."""
        raise NotImplementedError

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """`skip_special_tokens=False` keeps special tokens' texts (vLLM's request field of that name)."""
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            continue_final_message: bool = False, tools: list[dict] | None = None,
                            template_kwargs: dict | None = None, chat_template: str | None = None) -> str:
        """The prompt text (model.chat_template.render_chat) under `chat_template`, else the model's;
        raises `ChatTemplateError` when the template refuses the conversation."""
        from tetriinfer.model.chat_template import render_chat

        return render_chat(chat_template or self.chat_template or SIMPLE_CHAT_TEMPLATE, messages,
                           add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                           tools=tools, special_tokens=self.special_tokens(), template_kwargs=template_kwargs)

    def special_tokens(self) -> dict[str, str]:
        """The special tokens' texts a template may name (`bos_token`, `eos_token`, ...)."""
        return {"bos_token": self.special_token_text(self.bos_token_id),
                "eos_token": self.special_token_text(self.eos_token_id)}

    def special_token_text(self, token_id: int | None) -> str:
        return ""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; then <bos>, <eos>, <pad>. Ids past those decode to nothing."""

    def __init__(self, bos_token_id: int = 256, eos_token_id: int = 257):
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.bos_token_id, *text.encode("utf-8")] if add_special_tokens else list(text.encode("utf-8"))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
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
        if (model_dir / CHAT_TEMPLATE_FILE).exists():  # newer repos keep it apart; transformers prefers it
            self.chat_template = (model_dir / CHAT_TEMPLATE_FILE).read_text()
        self.bos_token_id = self._token_id(config.get("bos_token"))
        self.eos_token_id = self._token_id(config.get("eos_token"))

    def _token_id(self, token) -> int | None:
        return None if token is None else self._tok.token_to_id(_token_text(token))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def special_token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self._tok.id_to_token(token_id) or "")

    def special_tokens(self) -> dict[str, str]:
        named = {key: _token_text(self.config.get(key)) for key in SPECIAL_TOKEN_KEYS if self.config.get(key)}
        return {**named, **super().special_tokens()}


def _token_text(token) -> str:
    """A config's special token as text (older configs store AddedToken dicts)."""
    return token.get("content", "") if isinstance(token, dict) else str(token)


def load_tokenizer(model_dir: Path | None, bos_token_id: int | None, eos_token_id: int | None) -> Tokenizer | None:
    """The model directory's tokenizer.json; the byte tokenizer for presets; None when a directory has none."""
    if model_dir is None:
        return ByteTokenizer(bos_token_id if bos_token_id is not None else 256, eos_token_id if eos_token_id is not None else 257)
    if (model_dir / "tokenizer.json").exists():
        return HFTokenizer(model_dir)
    return None
