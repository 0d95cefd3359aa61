"""The API process's side of the cluster: implements server.backend.Backend over ZeroMQ.

Requests go to the controller; their deltas come straight from whichever instance holds them.
The client tracks each request's owner (the instance routed to, then the decode instance its KV
moved to), so when the controller reports an instance dead, exactly the requests it held end
with an error.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from tetriinfer.cluster import messages as msg
from tetriinfer.cluster.zmq_io import AsyncInbox, Outboxes
from tetriinfer.model.tokenizer import Tokenizer
from tetriinfer.sampling_params import SamplingParams

log = logging.getLogger("tetriinfer.client")


@dataclass
class _Live:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    owner: int | None = None


class ClusterClient:
    def __init__(self, inbox: AsyncInbox, controller_address: str, *, model_name: str, max_model_len: int,
                 vocab_size: int, tokenizer: Tokenizer) -> None:
        self.inbox = inbox
        self.controller_address = controller_address
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.out = Outboxes(inbox.wire)
        self._live: dict[str, _Live] = {}
        self._stats: msg.ClusterStats | None = None
        self._ready = asyncio.Event()
        self._reader: asyncio.Task | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self, timeout_s: float) -> None:
        """Read the inbox from now on; wait until every instance has reported ready."""
        self._reader = asyncio.create_task(self._read())
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the cluster did not become ready within {timeout_s:.0f} s") from None

    async def close(self) -> None:
        self.out.send(self.controller_address, msg.Shutdown())
        if self._reader is not None:
            self._reader.cancel()
        for live in self._live.values():
            live.queue.put_nowait(msg.TokenDelta.ended("", "error", "server shutting down"))
        self.out.close()
        self.inbox.close()

    async def _read(self) -> None:
        while True:
            message = await self.inbox.recv()
            try:
                self._on_message(message)
            except Exception:  # noqa: BLE001 - the reader must survive anything
                log.exception("bad message %r", message)

    def _on_message(self, message) -> None:
        if isinstance(message, msg.TokenBatch):
            for delta in message.deltas:
                live = self._live.get(delta.request_id)
                if live is None:
                    continue  # ended already (aborted, or failed by an instance death)
                if not delta.token_ids and not delta.text and delta.finish_reason is None:
                    live.owner = message.instance_id  # its KV arrived on a decode instance
                    continue
                live.queue.put_nowait(delta)
        elif isinstance(message, msg.Routed):
            live = self._live.get(message.request_id)
            if live is not None and live.owner is None:
                live.owner = message.instance_id
        elif isinstance(message, msg.InstanceDied):
            for request_id, live in list(self._live.items()):
                if live.owner == message.instance_id:
                    live.queue.put_nowait(msg.TokenDelta.ended(
                        request_id, "error", f"instance {message.instance_id} died: {message.reason}"))
        elif isinstance(message, msg.ClusterStats):
            self._stats = message
        elif isinstance(message, msg.ClusterReady):
            self.max_model_len = min(self.max_model_len, message.max_model_len)
            self._ready.set()

    # ---- Backend ---------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                       prompt: str | None = None) -> AsyncIterator[msg.TokenDelta]:
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already in use")
        live = self._live[request_id] = _Live()
        finished = False
        try:
            self.out.send(self.controller_address, msg.Submit(request_id, list(prompt_token_ids), sampling, prompt))
            while True:
                delta = await live.queue.get()
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
        finally:
            self._live.pop(request_id, None)
            if not finished:  # the caller went away (client disconnect): free it everywhere
                self.out.send(self.controller_address, msg.Abort(request_id, "client gone"))

    async def abort(self, request_id: str) -> None:
        """Abort a live request. A request no longer live was never submitted, finished, or was
        already aborted by `generate`'s cleanup (the caller closed its stream): nothing to send."""
        live = self._live.pop(request_id, None)
        if live is None:
            return
        self.out.send(self.controller_address, msg.Abort(request_id))
        live.queue.put_nowait(msg.TokenDelta.ended(request_id, "abort", "request aborted"))

    def cluster_stats(self) -> msg.ClusterStats | None:
        return self._stats

    def healthy(self) -> bool:
        stats = self._stats
        if not self._ready.is_set() or stats is None:
            return False
        roles = {s.role for s in stats.instances}
        return "colocated" in roles or {"prefill", "decode"} <= roles

    @property
    def num_running(self) -> int:
        return len(self._live)
