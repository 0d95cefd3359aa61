"""The KV hand-off between a prefill instance P and a decode instance D: the two halves of
`cluster.instance.Instance` (mixed into it; their state lives there), the protocol in its docstring.

Every wait here has a deadline, all of `--kv-timeout` (`InstanceConfig.kv_timeout_s`):
- an offer P made waits for D's answer under a lease: D answers KVHold at once and renews it every
  third of the timeout while the offer waits for admission; a lease that lapses (D froze, or died
  before the controller noticed) or a D that leaves the address book (the controller found it
  dead) makes P take the offer back, stop offering to that D for two timeouts, and place the
  request again from the dispatch queue (another D, or, adaptive, decoding it on P);
- a prefilled request with no decode instance to go to fails after one timeout;
- D drops blocks reserved for KV that never comes; P fails a send not acknowledged in time.
D receives only the transfers it issued (id and sender as in its KVReady), and checks the size.
"""

from __future__ import annotations

import logging
import secrets
import time
from concurrent.futures import Future
from dataclasses import dataclass

from tetriinfer.cluster import messages as msg
from tetriinfer.sched.admission import AdmissionView, admits
from tetriinfer.sched.dispatcher import DecodeLoad
from tetriinfer.sched.lengths import blocks_for, is_heavy_decode, placement_blocks
from tetriinfer.sched.monitor import DECODE, PREFILL
from tetriinfer.sched.router import keep_on_prefill

log = logging.getLogger("tetriinfer.instance")
NO_DECODE_INSTANCE = "no decode instance is available"  # server.backend answers it 503 (retry later)


@dataclass
class Parked:
    """A prefilled request on a prefill instance, its KV held until a decode instance takes it."""

    request_id: str
    prediction: Future | None
    need_blocks: int = 0
    heavy: bool = False
    reserve_blocks: int = 0
    predicted_decode_tokens: int = 0
    decode_left: int = 0  # read by the oracle dispatch policy only; unknown when serving
    dst: int | None = None  # offered to this decode instance
    offer_id: int = 0
    lease_until: float = 0.0  # offered: take it back if D has not renewed its KVHold by then
    waiting_since: float = 0.0  # in the dispatch queue since
    transfer_id: int | None = None
    deadline: float = 0.0  # while sending: give up after this


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


class PrefillHandoff:
    """P's half: place prefilled requests, offer them, push their KV."""

    def _park(self, req) -> None:
        parked = self.parked.get(req.request_id)
        if parked is None:  # flipped from decode while this request was queued: predict now
            parked = self.parked[req.request_id] = Parked(req.request_id, self.predictor.submit([req.prompt_token_ids]))
        prompt, max_tokens = len(req.prompt_token_ids), req.sampling.max_tokens
        lower, upper = 1, max_tokens
        prediction = self._prediction(parked)
        if prediction is not None:
            lower, upper = min(prediction.lower, max_tokens), min(prediction.upper, max_tokens)
            parked.heavy = is_heavy_decode(prediction.bucket, self.predictor.buckets.granularity,
                                           self.config.policy.heavy_decode_tokens)
        parked.need_blocks, parked.reserve_blocks = placement_blocks(
            prompt, lower, upper, self.block_size, self.capacity_blocks)
        parked.predicted_decode_tokens = upper
        handoff_after = self.config.policy.handoff_after_tokens
        if self.adaptive and self.flip is None and len(req.output_token_ids) < handoff_after:
            # Its first tokens decode here; it parks again at `handoff_after` unless it ends first.
            self.engine.decode_here(req.request_id, park_at=handoff_after if handoff_after < max_tokens else 0)
            return
        parked.waiting_since = time.monotonic()
        self.dispatch_wait.append(parked)

    def _prediction(self, parked: Parked):
        """The length prediction, waited for at most one KV timeout (it runs beside the prefill and
        is normally done); None without one."""
        if parked.prediction is None:
            return None
        try:
            return parked.prediction.result(timeout=self.config.kv_timeout_s)[0]
        except Exception as e:  # noqa: BLE001 - a timeout or the predictor's error: place it without one
            log.error("instance %d: no length prediction for %s: %r", self.instance_id, parked.request_id, e)
            return None

    def _dispatch(self) -> None:
        if self.role != PREFILL or not self.dispatch_wait:
            return
        if self.adaptive and self.flip is None:
            self._keep_decodes()
        now = time.monotonic()
        for parked, dst in self.dispatcher.place_waiting(self.dispatch_wait, self.config.policy.sort_window):
            self._offer(parked, dst, now)
        self._fail_stranded(now)

    def _offer(self, parked: Parked, dst: int, now: float) -> None:
        self._next_offer += 1
        parked.dst, parked.offer_id, parked.lease_until = dst, self._next_offer, now + self.config.kv_timeout_s
        req = self.engine.requests[parked.request_id]
        if not self._send_to(dst, msg.KVOffer(parked.request_id, self.instance_id, req.num_computed_tokens,
                                              parked.need_blocks, parked.reserve_blocks, parked.heavy,
                                              parked.predicted_decode_tokens, parked.offer_id)):
            self._avoid(dst, now)
            self._take_back(parked, f"could not reach instance {dst}", now, withdraw=False)

    def _fail_stranded(self, now: float) -> None:
        """Fail what has had no decode instance to go to for a whole KV timeout."""
        if self.dispatcher.loads:
            self._no_decode_since = None
            return
        if self._no_decode_since is None:
            self._no_decode_since = now
        timeout = self.config.kv_timeout_s
        for parked in [p for p in self.dispatch_wait if now - max(p.waiting_since, self._no_decode_since) > timeout]:
            self.dispatch_wait.remove(parked)
            log.error("instance %d: no decode instance for %g s", self.instance_id, timeout)
            self._transfer_failed(parked, NO_DECODE_INSTANCE)

    def _take_back(self, parked: Parked, why: str, now: float, withdraw: bool = True) -> None:
        """Place an offered request again (its KV is still here): `withdraw` tells D to forget it."""
        dst = parked.dst
        log.warning("instance %d: request %s taken back from instance %s: %s", self.instance_id,
                    parked.request_id, dst, why)
        if withdraw and dst in self.addresses:
            self._send_to(dst, msg.KVCancel(parked.request_id, -1, why))
        parked.dst, parked.lease_until, parked.waiting_since = None, 0.0, now
        self.num_redispatches += 1
        self.dispatch_wait.append(parked)

    def _avoid(self, dst: int, now: float) -> None:
        """Offer nothing to `dst` for two KV timeouts, or until it answers again: longer than a
        request taken back from it waits for another decode instance before failing."""
        self.avoided[dst] = now + 2 * self.config.kv_timeout_s
        self._update_dispatcher()

    def _heard_from(self, dst: int) -> None:
        if self.avoided.pop(dst, None) is not None:
            self._update_dispatcher()

    def _update_dispatcher(self) -> None:
        now = time.monotonic()
        for dst in [d for d, until in self.avoided.items() if until < now]:
            del self.avoided[dst]
        self.dispatcher.update([d.to_load() for d in self.decode_loads if d.instance_id not in self.avoided])

    def _keep_decodes(self) -> None:
        """Adaptive: prefilled requests that `sched.router.keep_on_prefill` keeps decode here."""
        for parked in list(self.dispatch_wait):
            req = self.engine.requests[parked.request_id]
            if req.num_pending:
                continue  # its first token is still on the device
            here = self._own_decode_load(extra_room_blocks=len(req.block_ids))  # its KV is already here
            if not keep_on_prefill(self.step_cost, here, self.dispatcher.loads, parked.need_blocks,
                                   req.num_computed_tokens, self.chunk_size):
                continue
            self.dispatch_wait.remove(parked)
            self.parked.pop(parked.request_id, None)
            self.engine.decode_here(parked.request_id)
            self.num_kept_decodes += 1

    def _own_decode_load(self, extra_room_blocks: int) -> DecodeLoad:
        """This instance as a decode site (the prefill role's side of keep_on_prefill)."""
        load = self.engine.load()
        return DecodeLoad(self.instance_id, load.free_blocks + extra_room_blocks,
                          free_slots=self.max_num_seqs - load.num_running,
                          queued_prompt_tokens=self.queue.pending_tokens + load.waiting_tokens,
                          num_running=load.num_running, context_tokens=load.running_context)

    def _offered(self, request_id: str, dst: int, offer_id: int) -> Parked | None:
        """The parked request whose current, unanswered offer is (dst, offer_id)."""
        parked = self.parked.get(request_id)
        if parked is None or parked.dst != dst or parked.offer_id != offer_id or parked.transfer_id is not None:
            return None
        return parked

    def _on_hold(self, hold: msg.KVHold) -> None:
        self._heard_from(hold.dst_instance)
        parked = self._offered(hold.request_id, hold.dst_instance, hold.offer_id)
        if parked is not None:
            parked.lease_until = time.monotonic() + self.config.kv_timeout_s

    def _on_ready(self, ready: msg.KVReady) -> None:
        self._heard_from(ready.dst_instance)
        parked = self._offered(ready.request_id, ready.dst_instance, ready.offer_id)
        if parked is None or ready.request_id not in self.engine.requests:
            self._send_to(ready.dst_instance, msg.KVCancel(ready.request_id, ready.transfer_id, "request is gone"))
            return
        kv = self.engine.export_request(ready.request_id)  # frees this side's blocks
        self.sent_tokens.pop(ready.request_id, None)
        parked.transfer_id = ready.transfer_id
        parked.deadline = time.monotonic() + self.config.kv_timeout_s
        try:
            descriptor = self.transport.start_send(ready.dst_instance, ready.transfer_id, kv.k, kv.v)
        except Exception as e:  # noqa: BLE001 - any transport failure ends this request, not the instance
            self._transfer_failed(parked, f"KV transfer to instance {ready.dst_instance} failed: {e}")
            return
        self.sending[ready.transfer_id] = parked
        if not self._send_to(ready.dst_instance, msg.KVPush(
                kv.request_id, self.instance_id, ready.transfer_id, kv.prompt_token_ids, kv.output_token_ids,
                kv.output_logprobs, kv.sampling, kv.prompt, descriptor)):
            self._transfer_failed(parked, f"could not reach instance {ready.dst_instance}")
            return
        self.transfers_out.bytes += kv.nbytes

    def _on_done(self, done: msg.KVDone) -> None:
        parked = self.sending.pop(done.transfer_id, None)
        self.transport.release(done.transfer_id)
        if parked is None:
            return
        self.parked.pop(parked.request_id, None)
        if done.ok:
            self.transfers_out.count += 1
            self.transfers_out.seconds += done.seconds
        else:  # the decode side may have reported it too: the API ends a request once
            self.transfers_out.failures += 1
            self._fail(parked.request_id, f"KV transfer to instance {parked.dst} failed: {done.error}")

    def _transfer_failed(self, parked: Parked, error: str) -> None:
        self.transfers_out.failures += 1
        if parked.transfer_id is not None:
            self.transport.cancel_send(parked.transfer_id)
            self.sending.pop(parked.transfer_id, None)
            if parked.dst in self.addresses:
                self._send_to(parked.dst, msg.KVCancel(parked.request_id, parked.transfer_id, error))
        self.parked.pop(parked.request_id, None)
        if parked.request_id in self.engine.requests:
            self.engine.abort_request(parked.request_id)
        self._fail(parked.request_id, error)

    def _poll_prefill(self, now: float) -> None:
        for parked in list(self.sending.values()):
            if now > parked.deadline or parked.dst not in self.addresses:
                self._transfer_failed(parked, f"KV transfer to instance {parked.dst} timed out or its peer died")
        for parked in [p for p in self.parked.values() if p.dst is not None and p.transfer_id is None]:
            if parked.dst not in self.addresses:
                self._take_back(parked, f"instance {parked.dst} left the cluster", now)
            elif now > parked.lease_until:
                self._avoid(parked.dst, now)
                self._take_back(parked, f"instance {parked.dst} did not answer for {self.config.kv_timeout_s:g} s", now)


class DecodeHandoff:
    """D's half: admit offers, reserve blocks, receive their KV."""

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
        running = self.engine.running_requests()
        reserved = {rid: a.reserve_blocks for rid, a in self.assigned.items()
                    if rid in self.incoming or rid in self.engine.requests}
        # The running request predicted to finish first gives its reservation back first.
        shortest = min(running, key=lambda r: self.assigned[r.request_id].predicted_total_tokens - r.num_tokens
                       if r.request_id in self.assigned else 1 << 30, default=None)
        shortest_blocks = reserved.get(shortest.request_id, 0) if shortest is not None else 0
        return AdmissionView(self.capacity_blocks, self.engine.free_blocks, sum(reserved.values()),
                             shortest_blocks, len(running) + len(self.incoming), self.max_num_seqs)

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
            reserved = self.engine.reserve_blocks(offer.num_cached_tokens)
            deadline = time.monotonic() + self.config.kv_timeout_s
            self.incoming[offer.request_id] = Incoming(offer, transfer_id, reserved, deadline)
            self.issued[transfer_id] = Issued(offer.src_instance, deadline + self.config.kv_timeout_s)
            if not self._send_to(offer.src_instance, msg.KVReady(offer.request_id, self.instance_id, transfer_id,
                                                                 offer.offer_id)):
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
            expected = incoming.offer.num_cached_tokens * self.engine.kv_bytes_per_token
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
        self._receives[push.transfer_id] = (future, push)

    def _poll_decode(self, now: float) -> None:
        for transfer_id, (future, push) in list(self._receives.items()):
            if future.done():
                del self._receives[transfer_id]
                self._land(push, future)
        for rid, incoming in list(self.incoming.items()):
            if not incoming.receiving and (now > incoming.deadline or incoming.offer.src_instance not in self.addresses):
                self._drop_incoming(rid, "KV never arrived from instance %d" % incoming.offer.src_instance)
        for queued in [q for q in self.offers if now - q.held_at >= self.config.kv_timeout_s / 3]:
            self._hold(queued, now)
        for transfer_id in [t for t, issued in self.issued.items() if issued.until < now]:
            del self.issued[transfer_id]

    def _land(self, push: msg.KVPush, future: Future) -> None:
        from tetriinfer.engine.engine import RequestKV

        error = None
        try:
            k, v = future.result()
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
            kv = RequestKV(push.request_id, push.prompt, push.prompt_token_ids, push.output_token_ids,
                           push.output_logprobs, push.sampling, time.monotonic(), None, k, v)
            try:
                req = self.engine.import_request(kv, incoming.block_ids)
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
        self.transfers_in.seconds += seconds
        self.sent_tokens[req.request_id] = len(req.output_token_ids)
        self._deltas.append(msg.TokenDelta(req.request_id, [], ""))  # ownership moves here
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
