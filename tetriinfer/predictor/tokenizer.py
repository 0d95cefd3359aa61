"""Tokenizers for the predictor: the one it reads prompts with, and the one that counts labels.

The built-in model trains its own byte-level BPE on the training split (the `tokenizers`
library), and by default labels are counted in that tokenizer's tokens. When the served model's
`tokenizer.json` is given, labels are counted in its tokens instead, so buckets match what the
decode instance will generate.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def train_bpe(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.json` file, or a directory holding one (a Hugging Face model directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return Tokenizer.from_file(str(path))


def count_tokens(tokenizer: Tokenizer, texts: list[str], batch_size: int = 1024) -> list[int]:
    counts = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer.encode_batch(texts[start : start + batch_size], add_special_tokens=False)
        counts.extend(len(enc.ids) for enc in batch)
    return counts
