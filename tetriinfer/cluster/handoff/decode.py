"""D's half of the KV hand-off (`cluster.handoff`): admit offers, reserve blocks, receive their KV
and land it in the engine, and drop what never comes."""

from __future__ import annotations

import logging
import secrets
import time
from concurrent.futures import Future
from dataclasses import dataclass

from tetriinfer.cluster import messages as msg
from tetriinfer.engine.load import EngineLoad
from tetriinfer.engine.serving import RequestKV, RequestState
from tetriinfer.sched.admission import AdmissionView, admits
from tetriinfer.sched.dispatcher import DecodeLoad
from tetriinfer.sched.instance_view import admission_view, decode_load
from tetriinfer.sched.lengths import blocks_for
from tetriinfer.sched.monitor import DECODE

log = logging.getLogger("tetriinfer.instance")


@dataclass
class Assigned:
    """A request sent to this decode instance and not finished: what the dispatcher's view counts."""

    need_blocks: int
    heavy: bool
    reserve_blocks: int
    predicted_total_tokens: int


@dataclass
class Incoming:
    """A request admitted on a decode instance: blocks reserved, KV on its way."""

    offer: msg.KVOffer
    transfer_id: int
    block_ids: list[int]
    deadline: float
    skip_tokens: int = 0  # the KV before this token is in pinned prefix-cache blocks (block_ids' head)
    receiving: bool = False
    cancelled: bool = False


@dataclass
class Queued:
    """An offer waiting for admission on a decode instance, and when its KVHold was last sent."""

    offer: msg.KVOffer
    held_at: float = 0.0


@dataclass
class Issued:
    """A transfer a decode instance announced with KVReady: only its sender's KVPush is received."""

    src: int
    until: float


@dataclass
class Receiving:
    """A KVPush whose K/V are on their way in; `state`: its request, its times on this clock."""

    push: msg.KVPush
    future: Future
    state: RequestState


def state_on_this_clock(push: msg.KVPush, received_at: float) -> RequestState:
    """The pushed request's times moved from the sender's monotonic clock (another machine's has
    another origin) to this one's, as if the push took no time: its TTFT and latency still count
    from its arrival, not from its landing here."""
    return push.state.shifted(received_at - push.sent_at)


class DecodeHandoff:
    """D's half, mixed into `cluster.instance.Instance`."""

    def _assign_local(self, submit: msg.Submit) -> None:
        """A request routed here to prefill in place (adaptive): it decodes here too."""
        self.num_local_prefills += 1
        prompt = len(submit.prompt_token_ids)
        need = blocks_for(prompt + 1, self.block_size)
        self.assigned[submit.request_id] = Assigned(need, False, need, prompt + submit.sampling.max_tokens)

    def _decline_offers(self, reason: str) -> None:
        """Offers not yet admitted go back to their prefill instances, to be placed elsewhere."""
        while self.offers:
            offer = self.offers.popleft().offer
            self.assigned.pop(offer.request_id, None)
            self._send_to(offer.src_instance, msg.KVCancel(offer.request_id, -1, reason))

    def _on_offer(self, offer: msg.KVOffer) -> None:
        if self.role != DECODE or self.flip is not None:
            # Offered from a stale view (we flipped or are draining): the prefill side re-dispatches.
            self._send_to(offer.src_instance, msg.KVCancel(offer.request_id, -1, "not taking requests"))
            return
        self.assigned[offer.request_id] = Assigned(offer.need_blocks, offer.heavy, offer.reserve_blocks,
                                                   offer.num_cached_tokens + offer.predicted_decode_tokens)
        queued = Queued(offer)
        self.offers.append(queued)
        self._hold(queued, time.monotonic())

    def _hold(self, queued: Queued, now: float) -> None:
        """Send (or renew) the offer's lease; an offer whose P cannot be reached is dropped (P takes
        it back when the lease lapses)."""
        queued.held_at = now
        offer = queued.offer
        if not self._send_to(offer.src_instance, msg.KVHold(offer.request_id, self.instance_id, offer.offer_id)):
            self._drop_offer(offer.request_id)

    def _admission_view(self) -> AdmissionView:
        reserved = {rid: a.reserve_blocks for rid, a in self.assigned.items()
                    if rid in self.incoming or self.engine.has_request(rid)}
        predicted = {rid: a.predicted_total_tokens for rid, a in self.assigned.items()}
        return admission_view(self.capacity_blocks, self.engine.free_blocks, self.max_num_seqs,
                              self.engine.running_tokens(), len(self.incoming), reserved, predicted)

    def _decode_load(self, load: EngineLoad) -> DecodeLoad:
        """What this decode instance reports to the monitor (the dispatchers place by it)."""
        heavy = sum(1 for a in self.assigned.values() if a.heavy)
        return decode_load(self.instance_id, capacity_blocks=self.capacity_blocks, used_blocks=load.used_blocks,
                           assigned_need_blocks=sum(a.need_blocks for a in self.assigned.values()),
                           num_heavy=heavy, num_light=len(self.assigned) - heavy, max_num_seqs=self.max_num_seqs,
                           queued_prompt_tokens=self.queue.pending_tokens + load.waiting_tokens,
                           num_running=load.num_running, context_tokens=load.running_context)

    def _admit(self) -> None:
        while self.offers and self.role == DECODE:
            offer = self.offers[0].offer
            now_blocks = blocks_for(offer.num_cached_tokens + 1, self.block_size)
            if now_blocks > self.engine.free_blocks:  # no policy admits it (spares building the view)
                break
            if not admits(self.config.policy.admission_policy, self._admission_view(), now_blocks, offer.reserve_blocks):
                break
            self.offers.popleft()
            # Random start: a restarted instance does not reuse the ids of its predecessor's transfers.
            self._next_transfer = (self._next_transfer or secrets.randbits(31)) + 1
            transfer_id = self.instance_id << 32 | (self._next_transfer & 0xFFFFFFFF)
            # The cached run of its blocks is pinned and not moved; `now_blocks` above counted it as
            # new, so what admission allowed still fits.
            reserved = self.engine.reserve_kv(offer.num_cached_tokens, offer.block_keys)
            deadline = time.monotonic() + self.config.kv_timeout_s
            self.incoming[offer.request_id] = Incoming(offer, transfer_id, reserved.block_ids, deadline,
                                                       reserved.skip_tokens)
            self.issued[transfer_id] = Issued(offer.src_instance, deadline + self.config.kv_timeout_s)
            if not self._send_to(offer.src_instance, msg.KVReady(offer.request_id, self.instance_id, transfer_id,
                                                                 offer.offer_id, reserved.skip_tokens)):
                self.issued.pop(transfer_id, None)
                self._drop_incoming(offer.request_id, f"could not reach instance {offer.src_instance}")

    def _on_push(self, push: msg.KVPush) -> None:
        issued = self.issued.pop(push.transfer_id, None)
        if issued is None or issued.src != push.src_instance:
            self.kv_pushes_refused += 1
            log.error("instance %d: refused KVPush of transfer %d claiming instance %d: not a transfer issued to it",
                      self.instance_id, push.transfer_id, push.src_instance)
            return
        incoming = self.incoming.get(push.request_id)
        if incoming is not None and incoming.transfer_id == push.transfer_id:
            expected = (incoming.offer.num_cached_tokens - incoming.skip_tokens) * self.engine.kv_bytes_per_token
            if not isinstance(push.descriptor, dict) or push.descriptor.get("nbytes") != expected:
                self._give_up_incoming(push.request_id, "wrong KV size", push.transfer_id)
                self._fail(push.request_id, f"KV from instance {push.src_instance} is not {expected} bytes")
                self._send_to(push.src_instance, msg.KVDone(push.request_id, push.transfer_id, False, 0.0,
                                                            "wrong KV size"))
                return
            incoming.receiving = True
        # Receive even for a request given up meanwhile: the transport must be drained in order.
        device = self.config.engine.device
        future = self._recv_pool.submit(self.transport.recv, push.src_instance, push.transfer_id, push.descriptor,
                                        self.config.kv_timeout_s, device)
        self._receives[push.transfer_id] = Receiving(push, future, state_on_this_clock(push, time.monotonic()))

    def _poll_decode(self, now: float) -> None:
        for transfer_id, receiving in list(self._receives.items()):
            if receiving.future.done():
                del self._receives[transfer_id]
                self._land(receiving)
        for rid, incoming in list(self.incoming.items()):
            if not incoming.receiving and (now > incoming.deadline or incoming.offer.src_instance not in self.addresses):
                self._drop_incoming(rid, "KV never arrived from instance %d" % incoming.offer.src_instance)
        for queued in [q for q in self.offers if now - q.held_at >= self.config.kv_timeout_s / 3]:
            self._hold(queued, now)
        for transfer_id in [t for t, issued in self.issued.items() if issued.until < now]:
            del self.issued[transfer_id]

    def _land(self, receiving: Receiving) -> None:
        push = receiving.push
        error = None
        try:
            k, v = receiving.future.result()
        except Exception as e:  # noqa: BLE001
            error = f"KV transfer from instance {push.src_instance} failed: {e}"
        incoming = self.incoming.get(push.request_id)
        if incoming is None or incoming.transfer_id != push.transfer_id or incoming.cancelled:
            if incoming is not None and incoming.transfer_id == push.transfer_id:
                self._drop_incoming(push.request_id, "cancelled while receiving")
            self._send_to(push.src_instance, msg.KVDone(push.request_id, push.transfer_id, False, 0.0, "request is gone"))
            return
        del self.incoming[push.request_id]
        if error is None:
            try:
                req = self.engine.import_request(RequestKV(receiving.state, k, v, incoming.skip_tokens),
                                                 incoming.block_ids)
            except ValueError as e:
                error = f"KV from instance {push.src_instance} does not fit: {e}"
        if error is not None:
            self.engine.release_blocks(incoming.block_ids)
            self.assigned.pop(push.request_id, None)
            self.transfers_in.failures += 1
            self._fail(push.request_id, error)
            self._send_to(push.src_instance, msg.KVDone(push.request_id, push.transfer_id, False, 0.0, error))
            return
        seconds = time.monotonic() - (incoming.deadline - self.config.kv_timeout_s)
        self.transfers_in.count += 1
        self.transfers_in.bytes += k.nbytes + v.nbytes
        self.transfers_in.skipped_tokens += incoming.skip_tokens
        self.transfers_in.seconds += seconds
        self.sent_tokens[req.request_id] = len(req.output_token_ids)
        # Ownership moves here, after the tokens the prefill instance streamed
        self._deltas.append(msg.TokenDelta(req.request_id, [], "", output_offset=len(req.output_token_ids)))
        self._send_to(push.src_instance, msg.KVDone(push.request_id, push.transfer_id, True, seconds, None))

    def _drop_incoming(self, request_id: str, reason: str) -> None:
        incoming = self.incoming.pop(request_id)
        self.engine.release_blocks(incoming.block_ids)
        self.assigned.pop(request_id, None)
        log.warning("instance %d: dropped incoming %s: %s", self.instance_id, request_id, reason)

    def _give_up_incoming(self, request_id: str, reason: str, transfer_id: int = -1) -> None:
        """Forget a request's transfer `transfer_id` (-1: whatever it has here, offer included) and
        free the blocks reserved for its KV."""
        incoming = self.incoming.get(request_id)
        if incoming is not None and transfer_id in (-1, incoming.transfer_id):
            if incoming.receiving:
                incoming.cancelled = True  # the receive finishes, then its blocks are freed
            else:
                self._drop_incoming(request_id, reason)
        if transfer_id == -1:
            self._drop_offer(request_id)

    def _drop_offer(self, request_id: str) -> None:
        for queued in self.offers:
            if queued.offer.request_id == request_id:
                self.offers.remove(queued)
                self.assigned.pop(request_id, None)
                return
