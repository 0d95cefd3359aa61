"""Load generator against a running OpenAI-compatible server (`tetriinfer bench serve`).

Each `RequestSpec` becomes one streaming POST /v1/completions whose prompt is a list of token ids
of the spec's prompt length (a spec with prefix `hash_ids` gets one deterministic block of ids per
hash id, so equal ids are equal token blocks and the server's prefix cache sees real hits) and
whose `max_tokens` is its output length (`ignore_eos`, greedy), sent at its arrival offset from
the start of the run. One aiohttp session carries every request; the client measures send time,
first token and last token per request on one clock (seconds since the run started) and returns
`RequestRecord`s for `tetriinfer.metrics.summarize`. Failed requests (HTTP errors, broken streams,
server-side errors) are collected, never raised.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from tetriinfer.metrics import RequestRecord, Summary, summarize
from tetriinfer.bench.traces import HASH_BLOCK_TOKENS
from tetriinfer.bench.workload import RequestSpec

ERROR_BODY_CHARS = 300  # enough of an error response to say what went wrong


@dataclass(frozen=True)
class RequestFailure:
    request_id: int
    arrival_s: float  # when it was sent, seconds since the run started
    status: int | None  # HTTP status; None when no response came (connection error, timeout)
    error: str

    @property
    def reason(self) -> str:
        """A short key for grouping failures in a report."""
        return f"HTTP {self.status}" if self.status is not None else self.error.split(":", 1)[0]


@dataclass
class LoadResult:
    records: list[RequestRecord]  # successful requests, in completion order
    failures: list[RequestFailure] = field(default_factory=list)
    wall_s: float = 0.0  # run start to the last request's end (success or failure)
    model: str | None = None  # the model name the requests named

    def failures_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for failure in self.failures:
            counts[failure.reason] = counts.get(failure.reason, 0) + 1
        return counts

    def summary(self, num_instances: int, *, ttft_slo_s: float | None = None,
                tpot_slo_s: float | None = None) -> Summary:
        """`summarize` of the successful requests from the run's start (t=0). The client cannot see
        instances, so each of `num_instances` counts from the start to the last finish: resource
        time = num_instances x makespan. Raises ValueError when no request succeeded."""
        if not self.records:
            raise ValueError("no request succeeded: nothing to summarize")
        last_finish = max(r.finish_s for r in self.records)
        return summarize(self.records, {i: last_finish for i in range(num_instances)},
                         ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s, start_s=0.0)


def prompt_token_ids(request_id: int, length: int, vocab_size: int = 256, seed: int = 0,
                     hash_ids: Sequence[int] | None = None, block_tokens: int = HASH_BLOCK_TOKENS) -> list[int]:
    """Deterministic token ids in [0, vocab_size) for one request. Without `hash_ids` different
    requests get different ids, so no prefix is shared between them. With them, block i of the
    prompt (`block_tokens` ids) is drawn from a generator seeded by (seed, hash id i) alone, so two
    requests sharing their first k hash ids share exactly their first k blocks of tokens (a last
    partial block is that block's head); tokens beyond the ids are the request's own."""
    if length < 1:
        raise ValueError(f"request {request_id}: prompt length must be >= 1, got {length}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    tokens: list[int] = []
    for hash_id in (hash_ids or ())[: -(-length // block_tokens)]:
        # A separate seed space from requests' own ids (a third seed word), so the two never collide.
        block = np.random.default_rng([seed, int(hash_id), 1]).integers(0, vocab_size, size=block_tokens)
        tokens.extend(block[: length - len(tokens)].tolist())
    if len(tokens) < length:
        rng = np.random.default_rng([seed, request_id])
        tokens.extend(rng.integers(0, vocab_size, size=length - len(tokens)).tolist())
    return tokens


class SSEParser:
    """Incremental parser of a text/event-stream body: `feed` bytes, get the `data` payloads of
    every event completed so far. Lines end with LF or CRLF; comments and other fields are skipped."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._pending = ""  # text after the last line ending
        self._data: list[str] = []  # data lines of the event being read

    def feed(self, chunk: bytes) -> list[str]:
        lines = (self._pending + self._decoder.decode(chunk)).split("\n")
        self._pending = lines.pop()
        events = []
        for line in lines:
            line = line.removesuffix("\r")
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                if name == "data":
                    self._data.append(value.removeprefix(" "))
        return events

    def close(self) -> list[str]:
        """The events left when the body ends without a final blank line."""
        return self.feed(b"\n\n") if self._pending or self._data else []


def completions_url(url: str) -> str:
    base = url.rstrip("/")
    return (base if base.endswith("/v1") else base + "/v1") + "/completions"


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def fetch_model_name(session, url: str, api_key: str | None = None) -> str:
    """The first model GET /v1/models lists."""
    import aiohttp

    models_url = completions_url(url).removesuffix("/completions") + "/models"
    try:
        async with session.get(models_url, headers=_headers(api_key)) as response:
            body = await response.text()
            if response.status != 200:
                raise ValueError(f"GET {models_url} returned HTTP {response.status}: {body[:ERROR_BODY_CHARS]}")
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
        raise ValueError(f"cannot reach {models_url} ({type(e).__name__}: {e}); is the server running there?") from None
    models = json.loads(body).get("data") or []
    if not models:
        raise ValueError(f"GET {models_url} lists no model; pass the model name explicitly")
    return models[0]["id"]


@dataclass
class _Stream:
    """What one request's stream has shown so far.

    Every chunk with a choice is a step of output: the completions API streams a chunk per new
    token(s), with empty text when a token's characters are not complete yet (half of a UTF-8
    character, or an id a byte-level tokenizer has no text for). So the first such chunk is the
    first token, and the last one (the finish chunk) ends the request, whatever their text."""

    first_token_s: float | None = None
    last_token_s: float | None = None
    token_chunks: int = 0
    usage: dict | None = None
    done: bool = False
    error: str | None = None

    def on_event(self, payload: str, now: float) -> None:
        if payload.strip() == "[DONE]":
            self.done = True
            return
        message = json.loads(payload)
        if message.get("error"):
            error = message["error"]
            self.error = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            return
        if message.get("choices"):
            if self.first_token_s is None:
                self.first_token_s = now
            self.last_token_s = now
            self.token_chunks += 1
        if message.get("usage"):
            self.usage = message["usage"]


async def _send_one(session, url: str, spec: RequestSpec, payload: dict, headers: dict, t0: float,
                    timeout) -> RequestRecord | RequestFailure:
    sent = time.perf_counter() - t0
    stream = _Stream()
    try:
        async with session.post(url, json=payload, headers=headers, timeout=timeout) as response:
            if response.status != 200:
                body = await response.text()
                return RequestFailure(spec.request_id, sent, response.status, body[:ERROR_BODY_CHARS])
            parser = SSEParser()
            async for chunk in response.content.iter_any():
                now = time.perf_counter() - t0
                for event in parser.feed(chunk):
                    stream.on_event(event, now)
            for event in parser.close():
                stream.on_event(event, time.perf_counter() - t0)
        end = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - any broken request is a failure to report, not a crash
        return RequestFailure(spec.request_id, sent, None, f"{type(e).__name__}: {e}")
    if stream.error is not None:
        return RequestFailure(spec.request_id, sent, 200, f"stream error: {stream.error}")
    if not stream.done:
        return RequestFailure(spec.request_id, sent, 200, "stream ended before [DONE]")
    usage = stream.usage or {}
    output_tokens = usage.get("completion_tokens", stream.token_chunks)
    if output_tokens < 1:
        return RequestFailure(spec.request_id, sent, 200, "no output token streamed")
    return RequestRecord(
        request_id=spec.request_id,
        arrival_s=sent,
        first_token_s=end if stream.first_token_s is None else stream.first_token_s,
        finish_s=end if stream.last_token_s is None else stream.last_token_s,
        prompt_tokens=usage.get("prompt_tokens", spec.prompt_tokens),
        output_tokens=output_tokens,
    )


async def run_load(
    url: str,
    specs: Sequence[RequestSpec],
    *,
    model: str | None,
    api_key: str | None = None,
    vocab_size: int = 256,
    progress: bool = True,
    concurrency: int | None = None,
    seed: int = 0,
    timeout_s: float | None = None,
) -> LoadResult:
    """Send every spec to `url` (the server's root, e.g. http://127.0.0.1:8000) at its arrival offset
    and wait for all of them. `concurrency` caps requests in flight (later ones wait for a slot and
    count from when they are sent); `model=None` asks GET /v1/models; `timeout_s` bounds each request.
    """
    import aiohttp
    from tqdm import tqdm

    if not specs:
        raise ValueError("run_load needs at least one request spec")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    order = sorted(specs, key=lambda s: (s.arrival_s, s.request_id))
    endpoint = completions_url(url)
    headers = _headers(api_key)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    slots = asyncio.Semaphore(concurrency) if concurrency else None
    records: list[RequestRecord] = []
    failures: list[RequestFailure] = []
    # limit=0: aiohttp's default pool of 100 connections would queue requests silently and skew
    # their send times; --concurrency is the one cap.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0)  # below any server's idle timeout
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        if model is None:
            model = await fetch_model_name(session, url, api_key)
        bar = tqdm(total=len(order), disable=not progress, desc="bench serve", unit="req")
        last_end = 0.0

        async def one(spec: RequestSpec, payload: dict) -> None:
            nonlocal last_end
            try:
                outcome = await _send_one(session, endpoint, spec, payload, headers, t0, timeout)
            finally:
                if slots is not None:
                    slots.release()
            (records if isinstance(outcome, RequestRecord) else failures).append(outcome)
            last_end = max(last_end, time.perf_counter() - t0)
            bar.update(1)

        tasks = []
        t0 = time.perf_counter()
        for spec in order:
            payload = {
                "model": model,
                "prompt": prompt_token_ids(spec.request_id, spec.prompt_tokens, vocab_size, seed,
                                           getattr(spec, "hash_ids", None)),
                "max_tokens": spec.output_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            delay = t0 + spec.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is not None:
                await slots.acquire()  # FIFO: requests go out in arrival order
            tasks.append(asyncio.create_task(one(spec, payload)))
        await asyncio.gather(*tasks)
        bar.close()
    return LoadResult(records, failures, last_end, model)


def run_load_sync(url: str, specs: Sequence[RequestSpec], **kwargs) -> LoadResult:
    """`run_load` on a fresh event loop (keyword arguments as there)."""
    return asyncio.run(run_load(url, specs, **kwargs))
