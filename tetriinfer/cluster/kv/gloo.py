"""``gloo`` (torch.distributed over TCP): every instance process is a rank of one process group, made
at instance start. start_send hands the send to a thread of the transport, which connects, posts
and waits for the receiver until the transport's timeout_s; the sender learns the outcome from
the receiver (KVDone) and then calls release(). The bytes of each
direction src -> dst go over their own two-rank gloo group, built on first use through the
default group's store (only the two processes take part).
A gloo send or receive that times out closes the connection for good (gloo: "Application timeout
caused pair closure"), and a dead peer closes it too; so a failed connection is never reused:
each side moves that direction to a new *generation*, and the next transfer builds a fresh group.
The descriptor names the generation it was sent on, so a receiver that missed a failure catches
up, and one that saw a failure rejects a descriptor sent on the dead connection at once. The
price: after a one-sided failure (say the receiver timed out), the sender's next transfer fails
fast before the pair reconnects. Sends are not posted by start_send itself: building a
connection needs both processes, and the receiver joins only after it got KVPush. Transfers are
matched by tag (from transfer_id, modulo 2**30), so they may be received in any order; transfer
ids in flight between one pair must differ. CUDA tensors are staged through the CPU.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from tetriinfer.cluster.kv.base import (
    KVTransferError, KVTransport, TransferStats, as_bytes, check_peer, check_transfer_id, init_process_group,
    kv_layout, log_transfer, logger, make_descriptor, parse_descriptor, wait_work,
)

_MAX_GLOO_SENDS = 64  # sender threads of one gloo transport (sends in flight beyond it queue)
_STORE_PREFIX = "tetriinfer-kv"


@dataclass
class _Link:
    """One direction src -> dst of gloo connections between two ranks."""

    src: int
    dst: int
    gen: int = 0  # the connection generation in use; moves on when one fails
    group: Any = None  # the two-rank ProcessGroupGloo of `gen`, once built
    building: bool = False


@dataclass
class _GlooSend:
    peer: int
    gen: int
    k: torch.Tensor | None  # flat uint8 on the CPU; dropped once the send is over
    v: torch.Tensor | None
    start: float
    deadline: float  # time.monotonic()
    future: Future | None = None


def _gloo_tags(transfer_id: int) -> tuple[int, int]:
    base = (transfer_id % (1 << 30)) * 2  # gloo tags are C ints
    return base, base + 1


class GlooTransport(KVTransport):
    name = "gloo"

    def __init__(self, rank: int, world_size: int, init_method: str, device: str | torch.device = "cpu",
                 timeout_s: float = 30.0):
        import torch.distributed.distributed_c10d as c10d

        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.timeout_s = timeout_s  # each send's deadline, counted from start_send
        self._owns_group = init_process_group("gloo", init_method, rank, world_size, timeout_s)
        self._store = c10d._get_default_store()
        self._cond = threading.Condition()
        self._tx: dict[int, _Link] = {}
        self._rx: dict[int, _Link] = {}
        self._sends: dict[int, _GlooSend] = {}
        self._retired: list[Any] = []  # failed groups; kept until close() so that no op outlives its group
        # A send blocks until its receiver takes it: one thread each, so no send waits behind another.
        self._senders = ThreadPoolExecutor(_MAX_GLOO_SENDS, thread_name_prefix="kv-gloo-send")

    def _link(self, links: dict[int, _Link], src: int, dst: int) -> _Link:
        peer = dst if src == self.rank else src
        if peer not in links:
            links[peer] = _Link(src, dst)
        return links[peer]

    def _retire(self, link: _Link) -> None:
        if link.group is not None:
            self._retired.append(link.group)
        link.group, link.building = None, False

    def _fail(self, link: _Link, gen: int) -> None:
        """Connection `gen` of `link` failed: it is never used again; the next transfer builds gen + 1."""
        with self._cond:
            if link.gen == gen:
                self._retire(link)
                link.gen = gen + 1
            self._cond.notify_all()

    def _connect(self, link: _Link, gen: int, deadline: float):
        """The group of connection `gen`, built by this thread or another one."""
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        with self._cond:
            while True:
                if link.gen != gen:
                    raise KVTransferError(f"the gloo connection {link.src}->{link.dst} (generation {gen}) failed "
                                          f"earlier; generation {link.gen} replaces it")
                if link.group is not None:
                    return link.group
                if not link.building:
                    link.building = True
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KVTransferError(f"timed out waiting for the gloo connection {link.src}->{link.dst}")
                self._cond.wait(left)
        try:
            store = c10d.PrefixStore(f"{_STORE_PREFIX}/{link.src}-{link.dst}/{gen}", self._store)
            left = max(deadline - time.monotonic(), 0.001)
            group = dist.ProcessGroupGloo(store, 0 if self.rank == link.src else 1, 2, timedelta(seconds=left))
        except Exception as e:  # the peer did not come in time (or is dead)
            self._fail(link, gen)
            raise KVTransferError(f"could not connect gloo {link.src}->{link.dst} (generation {gen}): {e}") from e
        with self._cond:
            if link.gen != gen:  # failed meanwhile
                self._retired.append(group)
                raise KVTransferError(f"the gloo connection {link.src}->{link.dst} (generation {gen}) failed "
                                      f"while it was being built")
            link.group, link.building = group, False
            self._cond.notify_all()
            return group

    def start_send(self, peer: int, transfer_id: int, k: torch.Tensor, v: torch.Tensor) -> dict:
        check_transfer_id(transfer_id)
        check_peer(peer, self.rank, self.world_size)
        layout = kv_layout(k, v)
        start = time.perf_counter()
        kb, vb = as_bytes(k.cpu()), as_bytes(v.cpu())
        with self._cond:
            if transfer_id in self._sends:
                raise ValueError(f"transfer {transfer_id} was already started")
            gen = self._link(self._tx, self.rank, peer).gen
            send = _GlooSend(peer, gen, kb, vb, start, time.monotonic() + self.timeout_s)
            send.future = self._senders.submit(self._send, transfer_id, send)
            self._sends[transfer_id] = send
        return make_descriptor(self.name, layout, gen=gen)

    def _send(self, transfer_id: int, send: _GlooSend) -> None:
        """A sender thread: connect, post, wait for the receiver, until the send's deadline."""
        link = self._tx[send.peer]
        try:
            if time.monotonic() >= send.deadline:  # queued behind _MAX_GLOO_SENDS others too long
                raise KVTransferError(f"gloo transfer {transfer_id} to rank {send.peer} expired before it started")
            group = self._connect(link, send.gen, send.deadline)
            tag_k, tag_v = _gloo_tags(transfer_id)
            try:
                works = [group.send([send.k], 1, tag_k), group.send([send.v], 1, tag_v)]
                for work in works:
                    wait_work(work, send.deadline)
            except RuntimeError as e:
                self._fail(link, send.gen)
                raise KVTransferError(f"gloo transfer {transfer_id} to rank {send.peer} failed: {e}") from e
            stats = TransferStats(send.k.numel() + send.v.numel(), time.perf_counter() - send.start)
        except KVTransferError as e:
            logger.warning("%s", e)
            raise
        finally:
            send.k = send.v = None
        log_transfer(self.name, "sent to", send.peer, transfer_id, stats)

    def recv(self, peer: int, transfer_id: int, descriptor: dict, timeout_s: float,
             device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        deadline = time.monotonic() + timeout_s
        check_peer(peer, self.rank, self.world_size)
        layout = parse_descriptor(descriptor, self.name, ("gen",))
        gen = descriptor["gen"]
        start = time.perf_counter()
        with self._cond:
            link = self._link(self._rx, peer, self.rank)
            if gen < link.gen:
                raise KVTransferError(f"gloo transfer {transfer_id} from rank {peer} was sent on connection "
                                      f"generation {gen}, which failed here; the sender moves to a new one")
            if gen > link.gen:  # the sender saw a failure we did not: drop ours too
                self._retire(link)
                link.gen = gen
        group = self._connect(link, gen, deadline)
        n = layout.tensor_nbytes
        kb, vb = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
        tag_k, tag_v = _gloo_tags(transfer_id)
        try:
            works = [group.recv([kb], 0, tag_k), group.recv([vb], 0, tag_v)]
            for work in works:
                wait_work(work, deadline)
        except RuntimeError as e:
            self._fail(link, gen)
            raise KVTransferError(f"gloo transfer {transfer_id} from rank {peer} failed: {e}") from e
        return self._received(peer, transfer_id, kb, vb, layout, device, start)

    def cancel_send(self, transfer_id: int) -> None:
        """Drops a send whose thread has not started; one under way cannot be taken back (gloo has no
        cancel) and ends by itself by its deadline."""
        with self._cond:
            send = self._sends.pop(transfer_id, None)
            if send is None or not send.future.cancel():
                return
            send.k = send.v = None
            link = self._tx[send.peer]
            if link.gen == send.gen and link.group is None and not link.building:
                # The receiver may be building this generation for the cancelled transfer and will time
                # out and drop it: skip it here too, or our next build would wait for it in vain.
                link.gen += 1

    def release(self, transfer_id: int) -> None:
        with self._cond:
            self._sends.pop(transfer_id, None)

    def close(self) -> None:
        import torch.distributed as dist

        self._senders.shutdown(wait=False, cancel_futures=True)
        with self._cond:
            for link in [*self._tx.values(), *self._rx.values()]:
                self._retire(link)
            self._retired.clear()
            self._sends.clear()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
