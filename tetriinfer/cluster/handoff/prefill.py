"""P's half of the KV hand-off (`cluster.handoff`): place prefilled requests, offer them to decode
instances, push their KV, and take back what a decode instance did not answer for."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

from tetriinfer.cluster import messages as msg
from tetriinfer.cluster.handoff.decode import Assigned
from tetriinfer.sched.dispatcher import DecodeLoad
from tetriinfer.sched.instance_view import placement, prefill_site_load
from tetriinfer.sched.monitor import PREFILL
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


class PrefillHandoff:
    """P's half, mixed into `cluster.instance.Instance`."""

    def _park(self, req) -> None:
        parked = self.parked.get(req.request_id)
        if parked is None:  # the probe, or flipped from decode while this request was queued: predict now
            parked = self.parked[req.request_id] = Parked(req.request_id, self._predict(req))
        max_tokens = req.sampling.max_tokens
        placed = placement(len(req.prompt_token_ids), max_tokens, self._prediction(parked),
                           self.predictor.buckets.granularity, self.config.policy.heavy_decode_tokens,
                           self.block_size, self.capacity_blocks)
        parked.need_blocks, parked.reserve_blocks = placed.need_blocks, placed.reserve_blocks
        parked.heavy, parked.predicted_decode_tokens = placed.heavy, placed.predicted_decode_tokens
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
        kv = self.engine.parked_kv(parked.request_id)
        keys = self.engine.kv_block_keys(parked.request_id)  # D skips the run of them it holds
        if not self._send_to(dst, msg.KVOffer(parked.request_id, self.instance_id, kv.num_cached_tokens,
                                              parked.need_blocks, parked.reserve_blocks, parked.heavy,
                                              parked.predicted_decode_tokens, parked.offer_id, keys)):
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
        self.dispatcher.update([d for d in self.decode_loads if d.instance_id not in self.avoided])

    def _keep_decodes(self) -> None:
        """Adaptive: prefilled requests that `sched.router.keep_on_prefill` keeps decode here."""
        for parked in list(self.dispatch_wait):
            kv = self.engine.parked_kv(parked.request_id)
            if kv.token_on_device:
                continue  # its first token is still on the device
            here = self._own_decode_load(extra_room_blocks=kv.num_blocks)  # its KV is already here
            if not keep_on_prefill(self.step_cost, here, self.dispatcher.loads, parked.need_blocks,
                                   kv.num_cached_tokens, self.chunk_size):
                continue
            self.dispatch_wait.remove(parked)
            self.parked.pop(parked.request_id, None)
            self.engine.decode_here(parked.request_id)
            self.num_kept_decodes += 1

    def _own_decode_load(self, extra_room_blocks: int) -> DecodeLoad:
        """This instance as a decode site (the prefill role's side of keep_on_prefill)."""
        load = self.engine.load()
        return prefill_site_load(self.instance_id, free_blocks=load.free_blocks + extra_room_blocks,
                                 max_num_seqs=self.max_num_seqs,
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
        if parked is None or not self.engine.has_request(ready.request_id):
            self._send_to(ready.dst_instance, msg.KVCancel(ready.request_id, ready.transfer_id, "request is gone"))
            return
        parked.transfer_id = ready.transfer_id
        parked.deadline = time.monotonic() + self.config.kv_timeout_s
        self.sent_tokens.pop(ready.request_id, None)
        try:  # only the KV D does not hold; frees this side's blocks
            kv = self.engine.export_request(ready.request_id, ready.skip_tokens)
        except ValueError as e:  # a skip that is no block boundary of this request: D's reply is wrong
            self._transfer_failed(parked, f"cannot send the KV instance {ready.dst_instance} asked for: {e}")
            return
        try:
            descriptor = self.transport.start_send(ready.dst_instance, ready.transfer_id, kv.k, kv.v)
        except Exception as e:  # noqa: BLE001 - any transport failure ends this request, not the instance
            self._transfer_failed(parked, f"KV transfer to instance {ready.dst_instance} failed: {e}")
            return
        self.sending[ready.transfer_id] = parked
        if not self._send_to(ready.dst_instance, msg.KVPush(kv.state, self.instance_id, ready.transfer_id, descriptor,
                                                            time.monotonic())):
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

    def _on_decode_cancel(self, cancel: msg.KVCancel) -> None:
        """D declined an offer (place it again) or gave up a transfer (the request fails)."""
        parked = self.parked.get(cancel.request_id)
        if parked is None:
            return
        if cancel.transfer_id == -1 and parked.transfer_id is None:
            if parked.dst is not None:  # the decode instance declined: place it again
                self._take_back(parked, cancel.reason, time.monotonic(), withdraw=False)
            return
        self._transfer_failed(parked, f"decode instance gave up the transfer: {cancel.reason}")

    def _withdraw_parked(self, request_id: str) -> None:
        """An aborted request: stop its offer or send, and tell its decode instance."""
        parked = self.parked.pop(request_id, None)
        if parked is None:
            return
        if parked in self.dispatch_wait:
            self.dispatch_wait.remove(parked)
        if parked.transfer_id is not None:
            self.sending.pop(parked.transfer_id, None)
            self.transport.cancel_send(parked.transfer_id)
        if parked.dst is not None and parked.dst in self.addresses:
            self._send_to(parked.dst, msg.KVCancel(request_id, parked.transfer_id or -1, "aborted"))

    def _decode_waiting_here(self) -> None:
        """Flipping to decode: prefilled requests still waiting for a decode instance decode here."""
        while self.dispatch_wait:
            parked = self.dispatch_wait.popleft()
            self.parked.pop(parked.request_id, None)
            req = self.engine.decode_here(parked.request_id)
            self.assigned[req.request_id] = Assigned(parked.need_blocks, parked.heavy, parked.reserve_blocks,
                                                     req.num_tokens + parked.predicted_decode_tokens)
