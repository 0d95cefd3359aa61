"""Structured output (`SamplingParams.json_schema` / `json_object`) with xgrammar, an optional
library: `pip install 'tetriinfer[structured]'`. (xgrammar, not outlines: it installs from PyPI as a
CPU wheel and masks a step in microseconds; outlines pulls in a much larger stack.)

Each structured request carries a `GrammarState` (a matcher over the model's vocabulary), made at
its first sampled token. Before each sampling step the matcher catches up with the request's output
tokens, then writes the allowed-token bitmask of its row; the logits of every other token become
-inf. The state is rebuilt from the output tokens wherever the request goes, so a KV hand-off to
another engine needs nothing more. A row whose newest token is still on the device (async
scheduling) reads it back first: structured requests make that step wait for the device.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from tetriinfer.engine.request import Request
from tetriinfer.model.tokenizer import ByteTokenizer, Tokenizer
from tetriinfer.sampling_params import SamplingParams

INSTALL_HINT = "structured output needs xgrammar: pip install 'tetriinfer[structured]'"


def import_xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return xgrammar


# Each output constraint's parser in xgrammar, and what its error says. The checks need no tokenizer:
# the server checks requests with them, and the engine again in add_request (an offline caller).
_PARSERS = {"json_schema": ("from_json_schema", "unsupported JSON schema"),
            "regex": ("from_regex", "unsupported regex"),
            "grammar": ("from_ebnf", "unsupported grammar")}


def _check(kind: str, text: str) -> None:
    _parse(import_xgrammar(), kind, text)  # the import first: its error is not cached away


@functools.lru_cache(maxsize=256)  # the same schema comes with request after request; failures recheck
def _parse(xgr, kind: str, text: str) -> None:
    parser, what = _PARSERS[kind]
    try:
        getattr(xgr.Grammar, parser)(text)
    except Exception as e:  # RuntimeError / InvalidJSONError: the reason last, maybe after a time and a file
        reason = re.sub(r"^\[[0-9:]+\] \S+: ", "", str(e).splitlines()[-1])
        raise ValueError(f"{what}: {reason[:300]}") from None


def check_json_schema(schema: str) -> None:
    """Raise ValueError when xgrammar cannot turn `schema` (a JSON string) into a grammar (ImportError
    when xgrammar is missing)."""
    _check("json_schema", schema)


def check_regex(regex: str) -> None:
    """Raise ValueError when xgrammar cannot compile `regex` (ImportError when xgrammar is missing)."""
    _check("regex", regex)


def check_grammar(ebnf: str) -> None:
    """Raise ValueError when xgrammar cannot parse the EBNF grammar (ImportError when it is missing)."""
    _check("grammar", ebnf)


def check_sampling(sampling: SamplingParams) -> None:
    """The request's output constraint compiles (json_object always does)."""
    for kind in ("json_schema", "regex", "grammar"):
        if getattr(sampling, kind) is not None:
            _check(kind, getattr(sampling, kind))


def choice_regex(choices: list[str]) -> str:
    """A regex matching exactly one of `choices` (vLLM's guided_choice), metacharacters escaped."""
    special = set("\\.^$|?*+()[]{}/")
    return "(" + "|".join("".join("\\" + c if c in special else c for c in choice) for choice in choices) + ")"


class GrammarCompiler:
    """xgrammar's compiler over one tokenizer's vocabulary (compiled grammars are cached by it)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        xgr = import_xgrammar()
        self.xgr = xgr
        self.vocab_size = vocab_size
        stop_ids = list(eos_token_ids)
        if isinstance(tokenizer, ByteTokenizer):
            vocab = [bytes([i]) if i < 256 else b"" for i in range(vocab_size)]
            info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop_ids)
        else:  # HFTokenizer: a `tokenizers` tokenizer; xgrammar reads its decoder's type from the JSON
            backend = tokenizer._tok
            vocab_dict = backend.get_vocab(with_added_tokens=True)
            encoded = [""] * max(vocab_size, max(vocab_dict.values()) + 1)
            for token, index in vocab_dict.items():
                encoded[index] = token
            metadata = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
            info = xgr.TokenizerInfo.from_vocab_and_metadata(encoded, metadata)
            info = xgr.TokenizerInfo(encoded, info.vocab_type, vocab_size=vocab_size, stop_token_ids=stop_ids,
                                     add_prefix_space=info.add_prefix_space)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)

    @functools.lru_cache(maxsize=256)
    def compile(self, json_schema: str | None, regex: str | None = None, grammar: str | None = None):
        if regex is not None:
            return self.compiler.compile_regex(regex)
        if grammar is not None:
            return self.compiler.compile_grammar(grammar)
        # json_object (no schema): any JSON object, as OpenAI means it (xgrammar's builtin JSON
        # grammar would also allow arrays and scalars).
        return self.compiler.compile_json_schema(json_schema if json_schema is not None else '{"type": "object"}')

    def new_state(self, sampling: SamplingParams) -> "GrammarState":
        matcher = self.xgr.GrammarMatcher(self.compile(sampling.json_schema, sampling.regex, sampling.grammar))
        return GrammarState(matcher, starts_after=sampling.structured_after_token_id)


@dataclass
class GrammarState:
    matcher: object  # xgrammar.GrammarMatcher
    num_accepted: int = 0  # output tokens seen so far (fed to the matcher once it started)
    failed: bool = False  # a token outside the grammar was fed (cannot happen unless masks are bypassed)
    starts_after: int | None = None  # the grammar waits for this token (`</think>`); None: started

    @property
    def waiting(self) -> bool:
        return self.starts_after is not None

    def catch_up(self, tokens: list[int]) -> None:
        for token in tokens[self.num_accepted:]:
            if self.waiting:
                if token == self.starts_after:
                    self.starts_after = None  # the thinking is over: constrain what follows
            elif not self.failed and not self.matcher.is_terminated():
                self.failed = not self.matcher.accept_token(token)
            self.num_accepted += 1


def apply_grammar_masks(logits: torch.Tensor, requests: list[Request], pending: torch.Tensor | None,
                        compiler: GrammarCompiler) -> None:
    rows = [row for row, r in enumerate(requests) if r.sampling.structured]
    xgr = compiler.xgr
    bitmask = xgr.allocate_token_bitmask(len(requests), logits.shape[1])
    masked = []
    for row in rows:
        req = requests[row]
        if req.grammar is None:
            req.grammar = compiler.new_state(req.sampling)
        known = list(req.output_token_ids)
        if pending is not None and int(pending[row]) >= 0:  # waits for the step in flight
            known.append(int(pending[row]))
        req.grammar.catch_up(known)
        if req.grammar.waiting or req.grammar.failed or req.grammar.matcher.is_terminated():
            continue  # still thinking, or nothing left to constrain (it ends on the stop token it took)
        req.grammar.matcher.fill_next_token_bitmask(bitmask, row)
        masked.append(row)
    if masked:
        if logits.is_cuda:
            xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=masked)
        else:
            xgr.apply_token_bitmask_inplace(logits, bitmask, indices=masked)
