"""What `allowed_token_ids` and `bad_words` ban, as token ids, and the checks of a request's lists
against the vocabulary. No torch here: the API process checks requests with it before they reach
an engine (the masks themselves are `engine.token_masks`)."""

from __future__ import annotations

from tetriinfer.model.tokenizer import Tokenizer
from tetriinfer.sampling_params import SamplingParams


def bad_words_token_ids(bad_words: list[str], tokenizer: Tokenizer) -> list[list[int]]:
    """The token sequences `bad_words` bans. Each word (leading spaces dropped) is tokenized as it is
    (a word starting the text) and with one leading space (a word inside the text); the spaced form
    is kept only when it is a different word token of the same length (vLLM's rule: a tokenizer that
    spells the space as a token of its own would otherwise ban that space token)."""
    sequences: list[list[int]] = []
    for word in bad_words:
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not bare:  # a word the tokenizer normalises away spells nothing to ban
            continue
        sequences.append(bare)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            sequences.append(spaced)
    return sequences


def check_token_masks(sampling: SamplingParams, vocab_size: int, tokenizer: Tokenizer | None) -> None:
    """ValueError (its message starts with the field's name) for ids outside the vocabulary, or bad
    words without a tokenizer to spell them."""
    bad = next((t for t in sampling.allowed_token_ids or () if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"allowed_token_ids token id {bad} is outside the vocabulary [0, {vocab_size})")
    if not sampling.bad_words:
        return
    if tokenizer is None:
        raise ValueError("bad_words needs the model's tokenizer (this model has none)")
    for word in sampling.bad_words:
        bad = next((t for ids in bad_words_token_ids([word], tokenizer) for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"bad_words {word!r} has token id {bad}, outside the model's vocabulary [0, {vocab_size})")
