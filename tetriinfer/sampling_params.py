"""Per-request sampling parameters, in the shape vLLM users know."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20  # top-N alternatives per token (vLLM's default max_logprobs is 20)


@dataclass
class SamplingParams:
    """temperature 0 is greedy. top_k <= 0 and top_p == 1 disable those filters. With `seed`, the
    request samples the same tokens whatever else shares its batch.

    Penalties follow vLLM: `repetition_penalty` (> 0, 1 is off) divides positive logits and
    multiplies negative ones of every token seen in the prompt or the output; `frequency_penalty`
    and `presence_penalty` (in [-2, 2]) subtract count * f and [count > 0] * p over output tokens.
    `logit_bias` maps token ids to values in [-100, 100] added to their logits. All of them apply
    before temperature, top-k and top-p, and to greedy requests too.

    `logprobs`: None for none; N >= 0 returns each chosen token's log-probability plus the N most
    likely alternatives (`True` is read as 0: the chosen token's only). `prompt_logprobs`: the same
    for every prompt token (the first has none). Log-probabilities are those of the model's raw
    distribution, before penalties and temperature (vLLM's default, `raw_logprobs`).

    `allowed_token_ids` (vLLM's): only these token ids may be sampled (None or [] for any).
    `bad_words` (vLLM's): each word is tokenized as it is and with a leading space; a one-token word
    is never sampled, and a longer one's last token is banned whenever the output so far ends with
    its other tokens (engine.token_masks).

    `json_schema` / `json_object`: the output is constrained to JSON (matching the schema, a JSON
    string); `regex`: to a regular expression; `grammar`: to an EBNF grammar; with the optional grammar library (`pip install 'tetriinfer[structured]'`)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0  # keep tokens at least min_p x the likeliest one's probability (vLLM's)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False  # the text keeps the stop string that ended it (vLLM's)
    skip_special_tokens: bool = True  # False: the text keeps special tokens' texts (vLLM's)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # None (or []): any token
    bad_words: list[str] = field(default_factory=list)
    prompt_logprobs: int | None = None
    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None  # the output matches this regular expression (xgrammar's dialect)
    grammar: str | None = None  # the output is a sentence of this EBNF grammar (GBNF, as xgrammar reads it)
    # With a reasoning model: the constraint starts after this token (`</think>`), so the thinking
    # before it is free (vLLM's structured output under --reasoning-parser). None: from the first token.
    structured_after_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.bad_words is None:  # vLLM's default
            self.bad_words = []
        elif isinstance(self.bad_words, str):  # one word, as `stop` takes one string
            self.bad_words = [self.bad_words]
        if not self.allowed_token_ids:  # [] restricts nothing (a client's "unset")
            self.allowed_token_ids = None
        # Back-compat: logprobs=True meant "the chosen token's"; False meant none.
        if self.logprobs is True:
            self.logprobs = 0
        elif self.logprobs is False:
            self.logprobs = None
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {value}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}")
        if self.logit_bias:
            bad = next((v for v in self.logit_bias.values() if not -100.0 <= v <= 100.0), None)
            if bad is not None:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bad}")
            bad_id = next((t for t in self.logit_bias if t < 0), None)
            if bad_id is not None:
                raise ValueError(f"logit_bias token id {bad_id} is negative")
        if self.structured_after_token_id is not None and self.structured_after_token_id < 0:
            raise ValueError(f"structured_after_token_id must be a token id, got {self.structured_after_token_id}")
        bad_id = next((t for t in self.allowed_token_ids or () if t < 0), None)
        if bad_id is not None:
            raise ValueError(f"allowed_token_ids token id {bad_id} is negative")
        if any(not isinstance(w, str) or not w.lstrip() for w in self.bad_words):
            raise ValueError("bad_words must be non-empty strings")
        if (self.json_schema is not None) + self.json_object + (self.regex is not None) + (self.grammar is not None) > 1:
            raise ValueError("json_schema, json_object, regex and grammar are exclusive")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def structured(self) -> bool:
        return self.json_schema is not None or self.json_object or self.regex is not None or self.grammar is not None
