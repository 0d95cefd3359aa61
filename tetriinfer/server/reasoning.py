"""Reasoning parsers (vLLM's `--reasoning-parser`): a thinking model's `<think>...</think>` text goes to
the message's `reasoning` field (also sent as `reasoning_content`, its older name), the rest to
`content`.

- `deepseek_r1` (DeepSeek-R1 and its distills, QwQ): the template opens `<think>` in the prompt, so
  the reply is reasoning until `</think>` (a leading `<think>` is dropped); a reply cut before
  `</think>` is all reasoning.
- `qwen3`: Qwen3 writes `<think>` itself when thinking; a reply that does not start with it
  (`enable_thinking: false`) is all content.

One `ReasoningSplitter` per choice takes the text as it streams (`feed`) and holds back only what
may be the start of a tag, so the stream and the whole body split the text the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START, THINK_END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningRule:
    starts_thinking: bool  # the prompt already opened <think>: the reply begins as reasoning


REASONING_PARSERS = {"deepseek_r1": ReasoningRule(starts_thinking=True), "qwen3": ReasoningRule(starts_thinking=False)}


def structured_start_token(tokenizer, prompt_token_ids: list[int]) -> int | None:
    """Under a reasoning parser, the token after which a structured output's constraint starts (vLLM
    leaves the thinking free): `</think>`, when it is one token and the prompt has not closed the
    thinking already (Qwen3's template writes `<think>\n\n</think>` for `enable_thinking: false`).
    None: constrain from the first token."""
    end = tokenizer.encode(THINK_END, add_special_tokens=False)
    if len(end) != 1:
        return None
    start = tokenizer.encode(THINK_START, add_special_tokens=False)
    for token in reversed(prompt_token_ids):  # the last tag in the prompt says which side it ends on
        if token == end[0]:
            return None
        if len(start) == 1 and token == start[0]:
            return end[0]
    return end[0]


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (held back, it may complete)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Splits one choice's text into (reasoning, content) pieces as it arrives."""

    def __init__(self, parser: str) -> None:
        if parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {parser!r}; known: {', '.join(REASONING_PARSERS)}")
        self.rule = REASONING_PARSERS[parser]
        self._pending = ""  # text not yet given out
        self._state = "opening"  # opening -> thinking -> answering
        self._closed_thinking = False  # a </think> was seen

    @property
    def thought(self) -> bool:
        """Whether the reply has (had) a reasoning part."""
        return self._state == "thinking" or self._closed_thinking

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that can be given out now that `text` has arrived."""
        self._pending += text
        reasoning = content = ""
        if self._state == "opening":
            stripped = self._pending.lstrip()
            if THINK_START.startswith(stripped) and len(stripped) < len(THINK_START):
                return "", ""  # could still become <think>
            if stripped.startswith(THINK_START):
                self._pending, self._state = stripped[len(THINK_START):], "thinking"
            else:
                self._state = "thinking" if self.rule.starts_thinking else "answering"
        if self._state == "thinking":
            end = self._pending.find(THINK_END)
            if end < 0:
                keep = partial_suffix(self._pending, THINK_END)
                reasoning, self._pending = self._pending[: len(self._pending) - keep], self._pending[len(self._pending) - keep:]
                return reasoning, ""
            reasoning, self._pending, self._state = self._pending[:end], self._pending[end + len(THINK_END):], "answering"
            self._closed_thinking = True
        if self._state == "answering":
            content, self._pending = self._pending, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held back, at the end of the reply."""
        rest, self._pending = self._pending, ""
        if self._state == "opening":  # a reply shorter than "<think>"
            self._state = "thinking" if self.rule.starts_thinking else "answering"
        return (rest, "") if self._state == "thinking" else ("", rest)


def split_reasoning(parser: str, text: str) -> tuple[str | None, str]:
    """A whole reply as (reasoning, or None when it had no reasoning part; content)."""
    splitter = ReasoningSplitter(parser)
    pieces = [splitter.feed(text), splitter.finish()]
    reasoning, content = "".join(r for r, _ in pieces), "".join(c for _, c in pieces)
    return (reasoning if splitter.thought else None), content
