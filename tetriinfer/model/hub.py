"""Hugging Face Hub model ids (`Qwen/Qwen2.5-0.5B-Instruct`) to local model directories.

`--model ORG/NAME` and `LLM(model="ORG/NAME")` resolve as vLLM's do: the local Hugging Face cache
first (`snapshot_download(..., local_files_only=True)`; `$HF_HUB_CACHE` / `$HF_HOME` say where it
is), then a download when online. `$HF_HUB_OFFLINE=1` stops before the network. Only the files the
loader reads are fetched (configs, tokenizer, chat template, safetensors), never `.bin` or GGUF
copies. `huggingface_hub` is optional (transformers brings it); without it a hub id fails with
how to install it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What resolve_model reads from a model directory: config.json, tokenizer.json,
# tokenizer_config.json (chat template), *.safetensors and their index; newer repos keep the chat
# template in chat_template.jinja.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja"]

# ORG/NAME as the Hub spells repository ids: letters, digits, '-', '_', '.'; one slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_TRUE = {"1", "true", "yes", "on"}


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub repository id rather than a path (`./org/name` and `/x/y` do
    not; the caller checks first that no such local path exists)."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def hub_offline() -> bool:
    # Read at call time: huggingface_hub reads it once, at import, and tests set it later.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> str | None:
    """$HF_HUB_CACHE when set (read now, not at huggingface_hub's import), else its default."""
    return os.environ.get("HF_HUB_CACHE") or None


def resolve_hub_model(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of `repo_id`: from the cache, else downloaded (unless offline).
    FileNotFoundError naming the id and the fix when neither works."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"model {repo_id!r} looks like a Hugging Face Hub id, which needs huggingface_hub: "
            f"`pip install huggingface_hub` (or pass a local model directory)"
        ) from None
    cache_dir = hub_cache_dir()
    kwargs = dict(revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS)
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and kin): try the Hub
        pass
    where = cache_dir or _default_cache()
    if hub_offline():
        raise FileNotFoundError(
            f"model {repo_id!r} is not in the Hugging Face cache ({where}) and HF_HUB_OFFLINE is set: "
            f"download it while online (`hf download {repo_id}`, or unset HF_HUB_OFFLINE and run again), "
            f"point $HF_HUB_CACHE at a cache that has it, or pass a local model directory"
        )
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except Exception as e:  # noqa: BLE001 - no network, unknown or gated repository, ...
        raise FileNotFoundError(
            f"model {repo_id!r} is not in the Hugging Face cache ({where}) and could not be downloaded "
            f"({type(e).__name__}: {_first_line(e)}). Check the id and your network; a gated model needs "
            f"`hf auth login` (or $HF_TOKEN); offline, copy the model into the cache or pass a local directory"
        ) from e


def _default_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 - only for the message
        return "~/.cache/huggingface/hub"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no details"
