"""One instance process: an engine on one device, driven by the `sched` policies of its role.

Roles (sched.monitor): PREFILL runs prompts in fixed-size chunks, streams the first token, predicts
the decode length, and hands the request (with its KV) to a decode instance its dispatcher picks;
DECODE admits offered requests (admission policy), reserves their blocks, receives their KV and
decodes them; COLOCATED (the baselines) runs whole requests. PREFILL and DECODE flip into each
other on the controller's order, in the same process with the same weights.

The hand-off, prefill P -> decode D, is `cluster.handoff` (its protocol in its docstring; P's half
and D's mixed in here). This file keeps the loop, the prompts in, the tokens out, aborts and flips;
the reports are `cluster.reports`; the length predictor's labels (and the probe's hidden states)
`cluster.length_labels`. The engine is used through its serving facade only (`engine.serving`), and the
policies' inputs are built from plain counts (`sched.instance_view`). Any failure (timeout, dead
peer, abort, a message that cannot be sent) frees what each side holds and ends the request with an
error delta to the API; nothing waits forever.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import zmq

from tetriinfer.cluster import messages as msg
from tetriinfer.cluster.handoff import TransferCounters
from tetriinfer.cluster.handoff.decode import Assigned, DecodeHandoff, Incoming, Issued, Queued, Receiving
from tetriinfer.cluster.handoff.prefill import Parked, PrefillHandoff
from tetriinfer.cluster.length_labels import LengthLabels, PromptStates
from tetriinfer.cluster.zmq_io import Inbox, Outboxes, Wire
from tetriinfer.config import EngineConfig, FlipConfig, PolicyConfig
from tetriinfer.cluster.reports import InstanceReports
from tetriinfer.sched.dispatcher import DecodeLoad, Dispatcher
from tetriinfer.sched.monitor import COLOCATED, DECODE, PREFILL
from tetriinfer.sched.prefill_queue import PrefillQueue
from tetriinfer.sched.step_cost import LinearStepCost, StepStats

log = logging.getLogger("tetriinfer.instance")


@dataclass
class InstanceConfig:
    instance_id: int
    role: str
    engine: EngineConfig
    policy: PolicyConfig
    flip: FlipConfig
    controller_address: str
    api_address: str
    host: str = "127.0.0.1"
    kv_transport: str = "shm"
    kv_init_method: str | None = None  # torch.distributed rendezvous for the gloo / nccl transports
    world_size: int = 1
    kv_timeout_s: float = 30.0
    stats_interval_s: float = 0.05
    predictor: str | None = None  # a trained predictor's directory; None: the shipped one; "none": constant
    torch_threads: int | None = None  # CPU instances sharing a machine: threads per instance
    env: dict[str, str] = field(default_factory=dict)  # set before CUDA starts (e.g. an MPS SM share)
    wire: Wire | None = None  # the cluster's keys and socket directory (cluster.zmq_io): the launcher's


@dataclass
class Pending:
    """A prompt waiting in the instance's prefill queue (the engine has not seen it yet)."""

    request_id: str
    submit: msg.Submit
    prompt_len: int
    num_prefilled: int = 0
    prediction: Future | None = None


@dataclass
class FlipState:
    to_role: str
    ordered_at: float


class Instance(PrefillHandoff, DecodeHandoff, LengthLabels, InstanceReports):
    def __init__(self, config: InstanceConfig) -> None:
        import torch

        from tetriinfer.cluster.kv import make_transport
        from tetriinfer.engine.engine import LLMEngine
        from tetriinfer.predictor.serving import load_predictor

        self.config = config
        self.instance_id = config.instance_id
        self.role = config.role
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.engine = LLMEngine(config.engine, stream_text=True)
        self.block_size = config.engine.cache.block_size
        self.capacity_blocks = self.engine.load().num_blocks
        self.chunk_size = config.engine.scheduler.chunk_size
        self.max_num_seqs = config.engine.scheduler.max_num_seqs
        tokenizer = self.engine.tokenizer
        self.predictor = None
        if config.role != COLOCATED:
            decode = tokenizer.decode if tokenizer is not None else None
            self.predictor = load_predictor(config.predictor, decode=decode, online=True)  # "static:..": off
        self.transport = make_transport(
            config.kv_transport, rank=config.instance_id, world_size=config.world_size,
            init_method=config.kv_init_method, device=config.engine.device, timeout_s=config.kv_timeout_s,
            cluster_id=config.wire.cluster_id,
        ) if config.role != COLOCATED else None
        self.inbox = Inbox(config.wire, config.host)
        self.out = Outboxes(config.wire)
        self.addresses: dict[int, str] = {}
        self.dispatcher = Dispatcher(config.policy.dispatch_policy, random.Random(config.instance_id))
        # The baselines serve FCFS, as vLLM and Sarathi-Serve do (and as the simulator's do).
        prefill_policy = "fcfs" if config.role == COLOCATED else config.policy.prefill_policy
        self.queue = PrefillQueue(prefill_policy, config.policy.sort_window)
        self.sent_tokens: dict[str, int] = {}  # output tokens already streamed, per engine request
        # prefill role (cluster.handoff.prefill)
        self.parked: dict[str, Parked] = {}
        self.dispatch_wait: deque[Parked] = deque()
        self.sending: dict[int, Parked] = {}  # transfer id -> request whose KV is on its way out
        self.decode_loads: list[DecodeLoad] = []  # the last snapshot's
        self.avoided: dict[int, float] = {}  # decode instance -> offer nothing to it until then
        self.num_redispatches = 0
        self._next_offer = 0
        self._no_decode_since: float | None = None
        # decode role (cluster.handoff.decode)
        self.offers: deque[Queued] = deque()
        self.incoming: dict[str, Incoming] = {}
        self.issued: dict[int, Issued] = {}  # transfer id -> its sender, until a KVPush is due
        self.assigned: dict[str, Assigned] = {}
        self.kv_pushes_refused = 0
        self.transfers_out = TransferCounters()
        self.transfers_in = TransferCounters()
        self._receives: dict[int, Receiving] = {}  # transfer id -> its KV being received
        self.label_to: dict[str, int] = {}  # request -> the prefill instance whose predictor gets its length
        self.prompt_states = PromptStates()  # the probe: hidden states of requests predicted here, until labelled
        self._recv_pool = ThreadPoolExecutor(1, thread_name_prefix="kv-recv")  # one at a time: p2p order
        self._next_transfer = 0
        self.flip: FlipState | None = None
        # adaptive disaggregation: steps measured for the cluster's cost fit, and what it returned
        self.adaptive = config.policy.disagg_policy == "adaptive" and config.role != COLOCATED
        self.step_stats = StepStats()
        self.step_cost = LinearStepCost()
        self.num_local_prefills = 0
        self.num_kept_decodes = 0
        self.prefix_queried_tokens = 0  # prompt tokens prefilled here, and those the prefix cache served
        self.prefix_hit_tokens = 0
        self._last_stats = 0.0
        self._running = True
        self._deltas: list[msg.TokenDelta] = []

    # ---- main loop -------------------------------------------------------------------------------
    def serve(self) -> None:
        cfg = self.config
        self._send_ready()
        try:
            while self._running:
                busy = self.engine.has_unfinished_requests() or bool(self.queue)
                for message in self.inbox.drain(timeout_ms=0 if busy else 5):
                    self._handle(message)
                self._feed_engine()
                if self.engine.has_unfinished_requests():
                    self._step()
                self._dispatch()
                self._admit()
                now = time.monotonic()
                self._poll_prefill(now)
                self._poll_decode(now)
                self._flush_deltas()
                self._maybe_finish_flip()
                now = time.monotonic()
                if now - self._last_stats >= cfg.stats_interval_s:
                    self._last_stats = now
                    self.out.send(cfg.controller_address, self._stats())
        finally:
            self._close()

    def _send_ready(self) -> None:
        self.out.send(self.config.controller_address, msg.Ready(
            self.instance_id, self.inbox.address, os.getpid(), self.role, self.engine.max_model_len))

    def _close(self) -> None:
        self._recv_pool.shutdown(wait=False, cancel_futures=True)
        for parked in self.sending.values():
            self.transport.cancel_send(parked.transfer_id)
        if self.transport is not None:
            self.transport.close()
        if self.predictor is not None:
            self.predictor.close()
        self.inbox.close()
        self.out.close()

    def _handle(self, message) -> None:
        if isinstance(message, msg.Submit):
            self._on_submit(message)
        elif isinstance(message, msg.Abort):
            self._on_abort(message.request_id)
        elif isinstance(message, msg.Snapshot):
            self._on_snapshot(message)
        elif isinstance(message, msg.KVOffer):
            self._on_offer(message)
        elif isinstance(message, msg.KVHold):
            self._on_hold(message)
        elif isinstance(message, msg.KVReady):
            self._on_ready(message)
        elif isinstance(message, msg.KVPush):
            self.label_to[message.request_id] = message.src_instance
            self._on_push(message)
        elif isinstance(message, msg.KVCancel):
            self._on_cancel(message)
        elif isinstance(message, msg.KVDone):
            self._on_done(message)
        elif isinstance(message, msg.LengthLabel):
            self._on_length_label(message)
        elif isinstance(message, msg.Flip):
            self._on_flip(message)
        elif isinstance(message, msg.Shutdown):
            self._running = False
        elif isinstance(message, msg.Register):  # a restarted controller rebuilds its view
            self._send_ready()
        else:
            log.warning("instance %d: unexpected message %r", self.instance_id, type(message).__name__)

    # ---- prompts in ------------------------------------------------------------------------------
    def _on_submit(self, submit: msg.Submit) -> None:
        prediction = None
        prompt = len(submit.prompt_token_ids)
        # Runs beside the prefill; the probe's waits for the prefill's hidden state (`_park`).
        if self.role == PREFILL and self.predictor is not None and not self.config.engine.capture_prompt_hidden:
            prediction = self.predictor.submit([submit.prompt_token_ids])
        elif self.role == DECODE:
            self._assign_local(submit)
        self.queue.add(Pending(submit.request_id, submit, prompt, prediction=prediction))

    def _feed_engine(self) -> None:
        """Hand prompts from the policy-ordered queue to the engine just in time: the engine's own
        chunker stays FCFS over what it has, so the queue's order (SJF, LJF) is the order served."""
        if not self.queue:
            return
        queued = self.engine.waiting_tokens
        if queued >= self.chunk_size:
            return
        for pending in self.queue.take(self.chunk_size - queued):
            s = pending.submit
            try:
                self.engine.add_request(s.request_id, prompt=s.prompt, prompt_token_ids=s.prompt_token_ids,
                                        sampling=s.sampling, prefill_only=self.role == PREFILL)
            except ValueError as e:  # the API validates first; this is the last line of defence
                self._fail(s.request_id, str(e))
                continue
            self.sent_tokens[s.request_id] = 0
            if pending.prediction is not None:
                self.parked[s.request_id] = Parked(s.request_id, pending.prediction)

    # ---- stepping and streaming -------------------------------------------------------------------
    def _step(self) -> None:
        from tetriinfer.engine.engine import NoProgress
        from tetriinfer.engine.request import RequestStatus

        started = time.monotonic()
        try:
            stepped = self.engine.step_requests()
        except NoProgress:
            return  # parked requests hold the cache; their hand-off frees it
        load = self.engine.last_step_load
        # With async scheduling a call spans about one device step, of the step it launched.
        self.step_stats.observe(time.monotonic() - started, load.prefill_tokens, load.prefill_context,
                                load.decode_seqs, load.decode_context)
        for req in stepped:
            self._emit(req)
            if req.status == RequestStatus.PREFILLED:
                self._park(req)
            elif req.status.finished:
                self._label(req)
                self.sent_tokens.pop(req.request_id, None)
                self.parked.pop(req.request_id, None)
                self.assigned.pop(req.request_id, None)

    def _emit(self, req) -> None:
        """Queue the request's new tokens (and its end) for the API."""
        sent = self.sent_tokens.get(req.request_id, 0)
        new = req.output_token_ids[sent:]
        self.sent_tokens[req.request_id] = sent + len(new)
        finished = req.status.finished
        text = req.detokenizer.take_delta() if req.detokenizer is not None else ""
        self._deltas.append(msg.TokenDelta(
            req.request_id, list(new), text,
            req.output_logprobs[sent:] if req.sampling.logprobs is not None else None,
            req.status.value if finished else None, req.stop_reason, None,
            req.num_cached_tokens if sent == 0 and new else None,  # the prefilling instance knows
            *req.delta_logprobs(sent, first=sent == 0 and bool(new)),
        ))
        if sent == 0 and new:  # its prompt was prefilled here
            self.prefix_queried_tokens += len(req.prompt_token_ids)
            self.prefix_hit_tokens += req.num_cached_tokens

    def _fail(self, request_id: str, error: str) -> None:
        log.warning("instance %d: request %s failed: %s", self.instance_id, request_id, error)
        self._deltas.append(msg.TokenDelta.ended(request_id, "error", error))

    def _flush_deltas(self) -> None:
        if not self._deltas:
            return
        deltas, self._deltas = self._deltas, []
        if not self.out.send(self.config.api_address, msg.TokenBatch(self.instance_id, deltas)):
            # The API cannot take them (gone or stalled): end the requests rather than run them blind.
            for delta in deltas:
                if delta.finish_reason is None:
                    self._on_abort(delta.request_id)

    # ---- abort, snapshot, flip -------------------------------------------------------------------
    def _on_abort(self, request_id: str) -> None:
        self.queue.remove(request_id)
        self.label_to.pop(request_id, None)
        self.prompt_states.pop(request_id)
        self._withdraw_parked(request_id)
        self.engine.abort_request(request_id)
        self.sent_tokens.pop(request_id, None)
        self._give_up_incoming(request_id, "aborted")
        self.assigned.pop(request_id, None)

    def _on_snapshot(self, snapshot: msg.Snapshot) -> None:
        self.addresses = dict(snapshot.addresses)
        if snapshot.step_cost:
            self.step_cost = LinearStepCost(tuple(snapshot.step_cost))
        self.decode_loads = list(snapshot.decode_loads)
        self._update_dispatcher()

    def _on_cancel(self, cancel: msg.KVCancel) -> None:
        if self.role == PREFILL or cancel.request_id in self.parked:
            self._on_decode_cancel(cancel)
        else:
            self._give_up_incoming(cancel.request_id, cancel.reason, cancel.transfer_id)

    def _on_flip(self, flip: msg.Flip) -> None:
        if flip.to_role == self.role or self.role == COLOCATED:
            return
        self.flip = FlipState(flip.to_role, time.monotonic())
        self._decline_offers("instance is flipping")

    def _maybe_finish_flip(self) -> None:
        if self.flip is None:
            return
        if self.role == PREFILL:
            in_flight = any(p.dst is not None for p in self.parked.values())
            load = self.engine.load()  # decodes it kept (adaptive) finish here first
            drained = not self.queue and not load.num_waiting and not in_flight and not load.num_running
        else:
            drained = (not self.engine.has_unfinished_requests() and not self.incoming and not self._receives
                       and not self.queue)
        if not drained:
            return
        drained_at = time.monotonic()
        if self.role == PREFILL:
            self._decode_waiting_here()
        self.role = self.flip.to_role
        switched_at = time.monotonic()
        self.out.send(self.config.controller_address, msg.FlipDone(
            self.instance_id, self.role, drained_at - self.flip.ordered_at, switched_at - drained_at))
        log.info("instance %d flipped to %s (drain %.3f s)", self.instance_id, self.role, drained_at - self.flip.ordered_at)
        self.flip = None
        self._last_stats = 0.0  # report the new role now

    def _send_to(self, instance_id: int, message) -> bool:
        """Send to another instance; False (logged) when it has no address or its queue stays full:
        the caller then fails or re-places the request the message was about."""
        address = self.addresses.get(instance_id)
        if address is None:
            log.warning("instance %d: no address for instance %d; dropped %s", self.instance_id, instance_id,
                        type(message).__name__)
            return False
        return self.out.send(address, message)


def run_instance(config: InstanceConfig) -> None:
    """Process entry point (local launcher and Ray)."""
    os.environ.update(config.env)
    logging.basicConfig(level=os.environ.get("TETRIINFER_LOG", "WARNING"),
                        format=f"%(asctime)s instance {config.instance_id} %(levelname)s %(message)s")
    try:
        Instance(config).serve()
    except zmq.ContextTerminated:
        pass
