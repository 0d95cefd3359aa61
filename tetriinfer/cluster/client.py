"""The API process's side of the cluster: implements server.backend.Backend over ZeroMQ.

Requests go to the controller; their deltas come straight from whichever instance holds them.
The client tracks each request's owner (the instance routed to, then the decode instance its KV
moved to), so when the controller reports an instance dead, exactly the requests it held end
with an error.

Every wait is bounded. A request waits for its next delta at most `idle_timeout_s` (then it fails),
and for its Routed at most `route_timeout_s` (then it gets a 503: the Submit was lost). While the
controller is down (the supervisor calls `controller_lost`, then restarts it) new requests get a 503
at once, requests not yet routed end with a 503, and routed ones keep streaming from their
instances; aborts wait for the new controller. Beyond `max_waiting_requests` requests without a
first token, `generate` raises `Overloaded` (a 429).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from tetriinfer.cluster import messages as msg
from tetriinfer.cluster.zmq_io import AsyncInbox, Outboxes
from tetriinfer.model.tokenizer import Tokenizer
from tetriinfer.sampling_params import SamplingParams
from tetriinfer.server.backend import CONTROLLER_DOWN, NOT_ROUTED, SHUTTING_DOWN, Overloaded

log = logging.getLogger("tetriinfer.client")


@dataclass(frozen=True)
class ClientConfig:
    max_waiting_requests: int = 1024  # requests without a first token; beyond: Overloaded (429)
    route_timeout_s: float = 10.0  # Submit to Routed while the controller is up
    idle_timeout_s: float = 600.0  # the longest gap between two deltas of a request
    silent_after_s: float = 5.0  # no ClusterStats for this long: the controller is not healthy
    poll_s: float = 1.0  # how often a waiting request checks the two timeouts above


@dataclass
class _Live:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    owner: int | None = None
    waiting: bool = True  # no output token yet: counts against max_waiting_requests
    submitted_at: float = field(default_factory=time.monotonic)
    last_event: float = field(default_factory=time.monotonic)
    received: int = 0  # output tokens delivered to `queue`
    handoff_at: int | None = None  # the owner's deltas start after this many tokens (a KV hand-off)
    held: list = field(default_factory=list)  # the new owner's deltas that overtook the old owner's last


class ClusterClient:
    def __init__(self, inbox: AsyncInbox, controller_address: str, *, model_name: str, max_model_len: int,
                 vocab_size: int, tokenizer: Tokenizer, config: ClientConfig = ClientConfig(),
                 sampling_defaults: dict | None = None) -> None:
        self.inbox = inbox
        self.controller_address = controller_address
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.sampling_defaults = sampling_defaults or {}  # requests' defaults (server.protocol.sampling_params)
        self.config = config
        self.out = Outboxes(inbox.wire)
        self._live: dict[str, _Live] = {}
        self._num_waiting = 0
        self._stats: msg.ClusterStats | None = None
        self._ready = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self.controller_up = False  # between ClusterReady and controller_lost
        self.last_heard = time.monotonic()  # the controller's last ClusterStats (its heartbeat)
        self.deaths: list[msg.InstanceDied] = []  # for the supervisor, which takes them
        self._aborts_pending: set[str] = set()  # to send once a restarted controller is ready
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self, timeout_s: float) -> None:
        """Read the inbox from now on; wait until every instance has reported ready."""
        self._reader = asyncio.create_task(self._read())
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the cluster did not become ready within {timeout_s:.0f} s") from None

    async def close(self) -> None:
        self._closed = True
        self.controller_up = False
        self.out.send(self.controller_address, msg.Shutdown())
        if self._reader is not None:
            self._reader.cancel()
        self.fail_all(SHUTTING_DOWN)
        self.out.close()
        self.inbox.close()

    def fail_all(self, error: str) -> None:
        """End every live request with `error` (the end of a shutdown's drain)."""
        for request_id, live in self._live.items():
            live.queue.put_nowait(msg.TokenDelta.ended(request_id, "error", error))

    def controller_lost(self, reason: str) -> None:
        """The supervisor found the controller dead or silent. Drop what was queued for it (Submits
        it will never route), end the requests it had not routed (503), keep the routed ones."""
        log.error("controller lost: %s", reason)
        self.controller_up = False
        self.out.close()  # linger 0: queued frames go; the next send connects afresh
        self.out = Outboxes(self.inbox.wire)
        for request_id, live in self._live.items():
            if live.owner is None:
                self._aborts_pending.add(request_id)  # its Submit may have been routed just before
                live.queue.put_nowait(msg.TokenDelta.ended(request_id, "error", CONTROLLER_DOWN))

    async def _read(self) -> None:
        while True:
            message = await self.inbox.recv()
            try:
                self._on_message(message)
            except Exception:  # noqa: BLE001 - the reader must survive anything
                log.exception("bad message %r", message)

    def _on_message(self, message) -> None:
        if isinstance(message, msg.TokenBatch):
            now = time.monotonic()
            for delta in message.deltas:
                live = self._live.get(delta.request_id)
                if live is None:
                    continue  # ended already (aborted, or failed by an instance death)
                live.last_event = now
                if not delta.token_ids and not delta.text and delta.finish_reason is None:
                    live.owner = message.instance_id  # its KV arrived on a decode instance
                    live.handoff_at = delta.output_offset
                    continue
                if (message.instance_id == live.owner and live.handoff_at is not None
                        and live.received < live.handoff_at and delta.finish_reason not in ("error", "abort")):
                    # The prefill instance's last tokens are still on their way (another socket).
                    live.held.append(delta)
                    continue
                self._deliver(live, delta)
        elif isinstance(message, msg.Routed):
            live = self._live.get(message.request_id)
            if live is not None and live.owner is None:
                live.owner = message.instance_id
                live.last_event = time.monotonic()
        elif isinstance(message, msg.InstanceDied):
            self.deaths = [*self.deaths[-63:], message]
            for request_id, live in list(self._live.items()):
                if live.owner == message.instance_id:
                    live.queue.put_nowait(msg.TokenDelta.ended(
                        request_id, "error", f"instance {message.instance_id} died: {message.reason}"))
                elif live.held:  # the tokens held back for may have died with it: wait no longer
                    held, live.held, live.handoff_at = live.held, [], None
                    for delta in held:
                        self._deliver(live, delta)
        elif isinstance(message, msg.ClusterStats):
            self._stats = message
            self.last_heard = time.monotonic()
        elif isinstance(message, msg.ClusterReady):
            self.max_model_len = min(self.max_model_len, message.max_model_len)
            self.last_heard = time.monotonic()
            if not self._closed:
                self.controller_up = True
            for request_id in self._aborts_pending:
                self.out.send(self.controller_address, msg.Abort(request_id, "lost with the controller"))
            self._aborts_pending.clear()
            self._ready.set()

    def _deliver(self, live: _Live, delta: msg.TokenDelta) -> None:
        """Hand `delta` to the request's reader; then the held deltas, once their turn has come."""
        if delta.token_ids:
            self._not_waiting(live)
        live.received += len(delta.token_ids)
        live.queue.put_nowait(delta)
        if live.held and (live.handoff_at is None or live.received >= live.handoff_at or delta.finish_reason):
            held, live.held = live.held, []
            for later in held:
                self._deliver(live, later)

    def _not_waiting(self, live: _Live) -> None:
        if live.waiting:
            live.waiting = False
            self._num_waiting -= 1

    # ---- Backend ---------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                       prompt: str | None = None) -> AsyncIterator[msg.TokenDelta]:
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not self.controller_up:
            yield msg.TokenDelta.ended(request_id, "error", SHUTTING_DOWN if self._closed else CONTROLLER_DOWN)
            return
        if self._num_waiting >= self.config.max_waiting_requests:
            raise Overloaded(f"the server has {self._num_waiting} requests waiting for their first token, "
                             f"its limit (--max-waiting-requests); retry later")
        live = self._live[request_id] = _Live()
        self._num_waiting += 1
        finished = False
        try:
            self.out.send(self.controller_address, msg.Submit(request_id, list(prompt_token_ids), sampling, prompt))
            while True:
                delta = live.queue.get_nowait() if not live.queue.empty() else await self._next(request_id, live)
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
        finally:
            self._not_waiting(live)
            self._live.pop(request_id, None)
            if not finished:  # the caller went away (client disconnect): free it everywhere
                self._abort(request_id, "client gone")

    async def _next(self, request_id: str, live: _Live) -> msg.TokenDelta:
        """The request's next delta; a failing one when a timeout passes first."""
        cfg = self.config
        while True:
            try:
                return await asyncio.wait_for(live.queue.get(), cfg.poll_s)
            except asyncio.TimeoutError:
                pass
            now = time.monotonic()
            if live.owner is None and self.controller_up and now - live.submitted_at > cfg.route_timeout_s:
                self._abort(request_id, "not routed in time")
                return msg.TokenDelta.ended(request_id, "error", NOT_ROUTED)
            if now - live.last_event > cfg.idle_timeout_s:
                self._abort(request_id, "no output in time")
                return msg.TokenDelta.ended(request_id, "error", f"no output for {cfg.idle_timeout_s:g} s")

    def _abort(self, request_id: str, reason: str) -> None:
        if self.controller_up:
            self.out.send(self.controller_address, msg.Abort(request_id, reason))
        elif not self._closed:
            self._aborts_pending.add(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a live request. A request no longer live was never submitted, finished, or was
        already aborted by `generate`'s cleanup (the caller closed its stream): nothing to send."""
        live = self._live.pop(request_id, None)
        if live is None:
            return
        self._not_waiting(live)
        self._abort(request_id, "aborted")
        live.queue.put_nowait(msg.TokenDelta.ended(request_id, "abort", "request aborted"))

    def cluster_stats(self) -> msg.ClusterStats | None:
        return self._stats

    def reported_pids(self) -> dict[int, int]:
        """instance id -> pid, as the controller last reported the live instances."""
        return {s.instance_id: s.pid for s in self._stats.instances} if self._stats is not None else {}

    def healthy(self) -> bool:
        stats = self._stats
        if not self.controller_up or stats is None:
            return False
        if time.monotonic() - self.last_heard > self.config.silent_after_s:
            return False
        roles = {s.role for s in stats.instances}
        return "colocated" in roles or {"prefill", "decode"} <= roles

    @property
    def num_running(self) -> int:
        return len(self._live)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting
