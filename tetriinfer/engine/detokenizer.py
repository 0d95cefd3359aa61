"""Incremental detokenization of one request's output, with stop strings and streaming holdback.

Two layers:
- decoding: turn token ids into text one token at a time through `Tokenizer.decode` alone. A token
  decoded on its own can lose a leading space (sentencepiece/Metaspace) or be part of a multi-byte
  character, so we decode a small window: the tokens of the previous step (context) plus the new
  ones, and take what the new ones add. Text ending in U+FFFD may be an unfinished character and is
  held until the next token settles it (or the request ends).
- stop strings and holdback: each new piece is searched together with the last max(len(stop)) - 1
  characters before it (linear, not a re-scan), and the text is cut before the first match. While
  streaming, a suffix that could still grow into a stop string is not released.

The text is `tokenizer.decode(output_token_ids)` cut at the stop string, the same text the engine
returns without streaming. The prompt is therefore not used as decoding context (with it, a
sentencepiece model's first output token would gain its leading space). For tokenizers whose whole
decode changes retroactively (sentencepiece byte fallback after an invalid byte run), the streamed
text of such garbage runs can differ from the whole decode; valid UTF-8 output is always exact.
"""

from __future__ import annotations

import functools

from tetriinfer.model.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Tokens that may stay undecided (text still ending in U+FFFD) before we settle all but the newest
# one. A UTF-8 character is at most 4 bytes, so only garbage output waits this long; the cap keeps
# the decode window, and so the cost per token, bounded.
MAX_PENDING_TOKENS = 16


class IncrementalDetokenizer:
    """Per-request detokenizer: `append` each sampled token, `take_delta` the text safe to stream,
    `finish` at the end. `stream_holdback=False` releases text at once (a delta may then hold the
    start of the stop string that ends the request; `text` is still cut). `include_stop`: the text
    keeps the stop string that ended it (vLLM's include_stop_str_in_output). `skip_special_tokens=False`
    keeps special tokens' texts (`[TOOL_CALLS]`, say) in the output."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], stream_holdback: bool = True,
                 include_stop: bool = False, skip_special_tokens: bool = True):
        if isinstance(stop, str):
            stop = [stop]
        bad = next((s for s in stop if not isinstance(s, str) or not s), None)
        if bad is not None:
            raise ValueError(f"stop strings must be non-empty strings, got {bad!r}")
        self.tokenizer = tokenizer
        self._decode = functools.partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)
        self.stop = list(stop)
        self.stream_holdback = stream_holdback
        self.include_stop = include_stop
        self._stop_overlap = max((len(s) for s in self.stop), default=1) - 1
        # decoding window: window[:read] is context whose text (prefix_text) was produced before;
        # window[read:] are the tokens not yet settled, of whose text `emitted` chars were released.
        self._window: list[int] = []
        self._read = 0
        self._prefix_text = ""
        self._emitted = 0
        self._invisible_ids: dict[int, bool] = {}
        # text so far, as pieces (joined lazily), and how much of it take_delta returned
        self._pieces: list[str] = []
        self._len = 0
        self._taken = 0
        self.stop_reason: str | None = None  # the stop string that matched
        self.finished = False

    @classmethod
    def replay(cls, tokenizer: Tokenizer, stop: list[str], output_token_ids: list[int],
               stream_holdback: bool = True, include_stop: bool = False,
               skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """Rebuild the state of a request that arrives mid-stream (KV import on a decode instance)
        whose producer took a delta after its last token: what that producer sent counts as taken."""
        detok = cls(tokenizer, stop, stream_holdback, include_stop, skip_special_tokens)
        for token_id in output_token_ids:
            if detok.append(token_id) is not None:
                raise ValueError(f"output tokens already end the request at stop string {detok.stop_reason!r}")
        detok.take_delta()
        return detok

    # ---- the caller's side -----------------------------------------------------------------------
    def append(self, token_id: int) -> str | None:
        """Add one output token. Returns the stop string when one now appears (the text is cut
        before it and the request should end), else None."""
        if self.finished or self.stop_reason is not None:
            raise RuntimeError("append after the request ended (finish() called or a stop string matched)")
        return self._extend(self._decode_step(token_id))

    def take_delta(self) -> str:
        """Text added since the last take that is safe to send."""
        end = self._len
        if self.stream_holdback and not self.finished and self.stop_reason is None:
            end -= self._held_back()
        if end <= self._taken:
            return ""
        delta = self._suffix(self._len - self._taken)[:end - self._taken]
        self._taken = end
        return delta

    def settle(self) -> None:
        """End of the request: settle undecided characters and release held-back text (to `text`
        and the next `take_delta`). A stop string in the settled text still cuts it (see
        `stop_reason`). Idempotent."""
        if not self.finished:
            if self.stop_reason is None:
                start = len(self._prefix_text) + self._emitted
                self._extend(self._decode(self._window)[start:])
            self.finished = True

    def finish(self) -> str:
        """`settle`, then the last delta."""
        self.settle()
        return self.take_delta()

    @property
    def text(self) -> str:
        """All text so far (cut before the stop string when one matched); O(length): read it at the end."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    # ---- decoding ---------------------------------------------------------------------------------
    def _decode_step(self, token_id: int) -> str:
        """The text that `token_id` settles (possibly none)."""
        window = self._window
        window.append(token_id)
        full = self._decode(window)
        start = len(self._prefix_text) + self._emitted
        if not full.endswith(REPLACEMENT_CHAR) and len(full) > start:
            # complete text grew: the unsettled tokens become the next step's context. (A decoder
            # whose output does not extend prefix_text is beyond this technique; we slice anyway.)
            del window[:self._read]
            self._read = len(window)
            self._prefix_text = self._decode(window)
            self._emitted = 0
            return full[start:]
        new = ""
        if full.endswith(REPLACEMENT_CHAR):
            # possibly an unfinished character: release only what comes before the U+FFFD run
            stable = len(full.rstrip(REPLACEMENT_CHAR))
            new = full[start:stable] if stable > start else ""
            self._emitted += len(new)
        if len(window) - self._read > MAX_PENDING_TOKENS:
            self._drop_invisible()
            if full.endswith(REPLACEMENT_CHAR) and len(window) - self._read > MAX_PENDING_TOKENS:
                new += self._settle_all_but_newest(full)
        return new

    def _drop_invisible(self) -> None:
        """Remove undecided tokens that decode to nothing anywhere (skipped special tokens, the byte
        tokenizer's ids past 255): a long run of them would otherwise grow the window without end."""
        pending = self._window[self._read:]
        kept = [t for t in pending if not self._is_invisible(t)]
        if len(kept) < len(pending):
            self._window[self._read:] = kept

    def _is_invisible(self, token_id: int) -> bool:
        # Twice, because a sentencepiece word-start token alone decodes to "" (its space is stripped
        # as the first token) but is visible after another token.
        invisible = self._invisible_ids.get(token_id)
        if invisible is None:
            invisible = self._invisible_ids[token_id] = self._decode([token_id, token_id]) == ""
        return invisible

    def _settle_all_but_newest(self, full: str) -> str:
        """Garbage bytes keep the text ending in U+FFFD: when the text without the newest token
        is a strict prefix of the text with it, that earlier text can no longer change."""
        window = self._window
        before = self._decode(window[:-1])
        if len(full) <= len(before) or not full.startswith(before):
            return ""
        released = len(self._prefix_text) + self._emitted
        new = full[released:len(before)] if len(before) > released else ""
        released += len(new)
        del window[:self._read]
        self._read = len(window) - 1
        self._prefix_text = self._decode(window[:self._read])
        self._emitted = released - len(before)
        return new

    # ---- stop strings and holdback ----------------------------------------------------------------
    def _extend(self, new: str) -> str | None:
        """Append settled text; cut it at the first stop string (in the order given, as the engine
        checks them). A match must end inside `new`, so the last overlap chars before it suffice."""
        if not new:
            return None
        if self.stop:
            tail = self._suffix(self._stop_overlap)
            window = tail + new
            for stop in self.stop:
                idx = window.find(stop)
                if idx >= 0:
                    cut = self._len - len(tail) + idx + (len(stop) if self.include_stop else 0)
                    kept = (self.text + new)[:cut]
                    self._pieces, self._len = [kept], cut
                    self.stop_reason = stop
                    return stop
        self._pieces.append(new)
        self._len += len(new)
        return None

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        tail = self._suffix(self._stop_overlap)
        held = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(tail)), held, -1):
                if tail.endswith(stop[:k]):
                    held = k
                    break
        return held

    def _suffix(self, n: int) -> str:
        """The last n characters of the text (fewer if it is shorter), from the newest pieces only."""
        if n <= 0:
            return ""
        parts, got = [], 0
        for piece in reversed(self._pieces):
            parts.append(piece)
            got += len(piece)
            if got >= n:
                break
        joined = "".join(reversed(parts))
        return joined[-n:]
