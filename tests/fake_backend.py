"""A fake `Backend` for the HTTP server's tests, and uvicorn in a background thread.

FakeBackend answers every request with the prompt's bytes reversed (the BOS dropped), repeated up
to max_tokens, one token per delta; stop_token_ids and stop strings end it early with "stop".
Knobs (plain attributes, set before a request): `delay_s` between deltas (a slow stream),
`fail_after` tokens then a delta with finish_reason "error" (`error_message`) or "abort"
(`fail_with`), or an exception raised (`fail_with="raise"`); `script`: every request answers this
text instead (one character a delta, its UTF-8 bytes the tokens; "stop" at its end, "length" at
max_tokens), e.g. a model's tool call. It records what it was asked
(`started`), which requests were aborted (`aborted`) and which streams were closed early (`closed`).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from tetriinfer.cluster.messages import ClusterStats, TokenDelta
from tetriinfer.model.tokenizer import ByteTokenizer
from tetriinfer.sampling_params import SamplingParams


@dataclass
class Started:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prompt: str | None


@dataclass
class FakeBackend:
    model_name: str = "fake-model"
    max_model_len: int = 128
    vocab_size: int = 259
    sampling_defaults: dict = field(default_factory=dict)
    tokenizer: ByteTokenizer = field(default_factory=ByteTokenizer)
    delay_s: float = 0.0
    fail_after: int | None = None  # tokens before failing; None never fails
    fail_with: str = "error"  # "error", "abort" (finish reasons) or "raise" (an exception)
    abort_delay_s: float = 0.0  # how long abort() suspends before it takes effect (all but the first)
    aborts_begun: int = 0
    error_message: str = "fake backend failure"
    is_healthy: bool = True
    stats: ClusterStats | None = None
    script: str | None = None  # the text every request answers, instead of the reversed prompt
    started: list[Started] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    _live: set[str] = field(default_factory=set)

    @staticmethod
    def continuation(prompt_token_ids: list[int], max_tokens: int) -> list[int]:
        """What the fake answers before stop handling: the prompt's bytes reversed, repeated."""
        source = [t for t in reversed(prompt_token_ids) if t < 256] or [ord("x")]
        return [source[i % len(source)] for i in range(max_tokens)]

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                       prompt: str | None = None):
        self.started.append(Started(request_id, list(prompt_token_ids), sampling, prompt))
        if self.script is not None:
            for delta in self.scripted(request_id, sampling):
                yield delta
            return
        self._live.add(request_id)
        finished = False
        try:
            text = ""
            for i, token in enumerate(self.continuation(prompt_token_ids, sampling.max_tokens)):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if request_id not in self._live:  # aborted
                    return
                if self.fail_after is not None and i >= self.fail_after:
                    finished = True
                    if self.fail_with == "raise":
                        raise RuntimeError(self.error_message)
                    yield TokenDelta(request_id, [], "", finish_reason=self.fail_with,
                                     error=self.error_message if self.fail_with == "error" else None)
                    return
                piece = self.tokenizer.decode([token])
                finish, stop_reason = None, None
                if token in sampling.stop_token_ids:
                    finish, stop_reason, piece = "stop", token, ""
                hit = next((s for s in sampling.stop if s in text + piece), None)
                if hit is not None:
                    finish, stop_reason = "stop", hit
                    piece = (text + piece)[: (text + piece).index(hit)][len(text):]
                elif finish is None and i == sampling.max_tokens - 1:
                    finish = "length"
                text += piece
                logprobs = [-0.25 * (i + 1)] if sampling.logprobs is not None else None
                finished = finish is not None
                yield TokenDelta(request_id, [token], piece, logprobs, finish, stop_reason,
                                 top_logprobs=[self.top(token, -0.25 * (i + 1), sampling.logprobs)]
                                 if sampling.logprobs else None,
                                 **(self.prompt_logprobs(prompt_token_ids, sampling.prompt_logprobs)
                                    if i == 0 and sampling.prompt_logprobs is not None else {}))
                if finished:
                    return
        finally:
            if not finished:
                self.closed.append(request_id)
            self._live.discard(request_id)

    def scripted(self, request_id: str, sampling: SamplingParams) -> list[TokenDelta]:
        deltas, count = [], 0
        for i, char in enumerate(self.script):
            ids = list(char.encode())[: sampling.max_tokens - count]
            count += len(ids)
            finish = "stop" if i == len(self.script) - 1 else "length" if count == sampling.max_tokens else None
            text = char if len(ids) == len(char.encode()) else ""  # a character cut by max_tokens: nothing
            deltas.append(TokenDelta(request_id, ids, text, [-0.25] * len(ids) if sampling.logprobs is not None
                                     else None, finish))
            if finish is not None:
                break
        return deltas

    @staticmethod
    def top(token: int, logprob: float, n: int) -> list[tuple[int, float]]:
        """The fake's top-n: the chosen token, then the next byte values, each 1.0 less likely."""
        return [((token + k) % 256, logprob - k) for k in range(n)]

    @classmethod
    def prompt_logprobs(cls, prompt_token_ids: list[int], n: int) -> dict:
        """The fake's prompt logprobs: -0.5 * position (none for the first token), each prompt token
        its position's likeliest (rank 1)."""
        values = [None] + [-0.5 * k for k in range(1, len(prompt_token_ids))]
        tops = [[]] + [cls.top(t, -0.5 * k, n) for k, t in enumerate(prompt_token_ids) if k]
        ranks = [None] + [1] * (len(prompt_token_ids) - 1)
        return {"prompt_logprobs": values, "prompt_top_logprobs": tops, "prompt_ranks": ranks}

    async def abort(self, request_id: str) -> None:
        # a real backend's abort may suspend (a socket send): the caller must not be cancelled there
        self.aborts_begun += 1
        await asyncio.sleep(self.abort_delay_s if self.aborts_begun > 1 else 0)
        self.aborted.append(request_id)
        self._live.discard(request_id)

    def cluster_stats(self) -> ClusterStats | None:
        return self.stats

    def healthy(self) -> bool:
        return self.is_healthy


def serve_in_thread(app, timeout_s: float = 10.0) -> tuple[str, Callable[[], None]]:
    """Run `app` under uvicorn on a free 127.0.0.1 port in a daemon thread. Returns the base URL
    (http://127.0.0.1:PORT) and a function that stops the server and joins the thread."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()

    return f"http://127.0.0.1:{port}", stop
