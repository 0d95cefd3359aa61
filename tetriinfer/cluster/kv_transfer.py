"""Moving one request's KV cache from a prefill instance process to a decode instance process.

The control messages travel over ZeroMQ (`KVReady`, `KVPush`, `KVCancel` in `cluster.messages`); the
tensor bytes travel through a `KVTransport`, one per instance process:

    decode : reserve blocks, send KVReady(transfer_id)
    prefill: descriptor = t.start_send(dst_rank, transfer_id, k, v); send KVPush(descriptor)
             (optional) stats = t.finish_send(transfer_id, timeout_s)       # blocks: worker thread
    decode : k, v = t.recv(src_rank, transfer_id, descriptor, timeout_s)  # blocks: worker thread
             write k, v into the reserved blocks, then tell the prefill (KVDone)
    prefill: t.release(transfer_id) on KVDone;
             t.cancel_send(transfer_id) instead when it gives up (timeout, failure, abort)

Every started send must end in finish_send, release or cancel_send (each frees what the transport
keeps for it); until then the sender must not modify K and V. K and V are each [num_layers,
num_tokens, kv_heads, head_dim] of one dtype, on the instance's device; the descriptor is plain
msgpack data. A transfer that times out, whose peer died or whose data is gone raises
`KVTransferError` on each side within about its timeout, and leaves nothing behind that could leak
or corrupt the next transfer.

Backends (`make_transport(kind, ...)`):

* ``shm`` (one host, CPU): start_send copies K and V into one POSIX shared-memory segment (Linux:
  a file in /dev/shm, allocated up front); recv maps it, unlinks it at once and copies out.
  finish_send returns at once (the copy is done). The segment belongs to nobody's
  `resource_tracker` (a tracker would unlink it when the sender exits, before the receiver read
  it); cancel_send, release and close unlink it if the receiver has not.
* ``gloo`` (torch.distributed over TCP): every instance process is a rank of one process group, made
  at instance start. start_send hands the send to a thread of the transport, which connects, posts
  and waits for the receiver until the transport's timeout_s; finish_send waits for that thread
  and is optional (release() after the receiver's acknowledgement does as well). The bytes of each
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
* ``nccl`` (GPUs, one host or several): point-to-point over the default NCCL group (release() or
  finish_send drop the finished op and its tensors: call one of them); the constructor
  connects every pair once (all ranks, same order) so that a send never blocks on a connection.
  NCCL ignores tags: sends and receives of one pair match in the order they are posted. start_send
  posts the sends and numbers them per destination; recv posts in that order (a recv waits for its
  turn), so the lead need not order its worker threads, but it must deliver every started send:
  once start_send returned, the receiver must recv it (and may drop the result), because a posted
  NCCL send cannot be taken back. Do not run transfers in both directions of one pair at once
  (their ops share one NCCL stream and can deadlock). A timeout or error is fatal for the pair
  (NCCL ops cannot be cancelled); later transfers with that peer raise at once.
* ``cuda_ipc`` (GPUs of one host): start_send copies K and V into one staging tensor on the sender's
  GPU and shares it by CUDA IPC handle; recv opens it and copies to its own device. finish_send
  does not wait for the receiver: the staging tensor lives until `release(transfer_id)` (the lead
  calls it when the decode side acknowledges) or `cancel_send`. Every process must see all GPUs
  (pick one with device="cuda:i", not with CUDA_VISIBLE_DEVICES), because the handle names the
  sender's device index. The descriptor holds the handle's fields, not a pickle, so a receiver
  never unpickles bytes from the network.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from tetriinfer.config import KV_TRANSPORTS

logger = logging.getLogger("tetriinfer.kv")

TRANSPORTS = tuple(name for name in KV_TRANSPORTS if name != "auto")  # "auto" is resolved by the launcher

# The process group waits at least this long for all ranks at init: instances load their models
# at different speeds.
_MIN_INIT_TIMEOUT_S = 300.0
_MAX_GLOO_SENDS = 64  # sender threads of one gloo transport (sends in flight beyond it queue)

_STORE_PREFIX = "tetriinfer-kv"


class KVTransferError(RuntimeError):
    """A KV transfer failed: timed out, its peer died, or its data is gone."""


@dataclass
class TransferStats:
    nbytes: int  # K and V together
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


class KVTransport(ABC):
    """Moves K/V tensors between instance processes; see the module docstring for the protocol."""

    name: str = ""

    @abstractmethod
    def start_send(self, peer: int, transfer_id: int, k: torch.Tensor, v: torch.Tensor) -> dict:
        """Begin sending K and V to rank `peer`; returns the descriptor the receiver's recv needs."""

    @abstractmethod
    def finish_send(self, transfer_id: int, timeout_s: float) -> TransferStats:
        """Block until the send is done as far as this backend can tell (see each backend)."""

    @abstractmethod
    def recv(self, peer: int, transfer_id: int, descriptor: dict, timeout_s: float,
             device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Receive K and V sent by rank `peer`, on `device` (default: the transport's device)."""

    @abstractmethod
    def cancel_send(self, transfer_id: int) -> None:
        """Give up a started send and free what it holds; idempotent."""

    def release(self, transfer_id: int) -> None:
        """The receiver acknowledged the transfer: drop what the sender kept for it (shm: the
        segment if still there; cuda_ipc: the staging tensor). Idempotent; a no-op for gloo/nccl."""

    @abstractmethod
    def close(self) -> None:
        """Free everything; call once no transfer is in flight."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _received(self, peer: int, transfer_id: int, k_bytes: torch.Tensor, v_bytes: torch.Tensor, layout,
                  device, start: float) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V from their received bytes, on `device` (default: the transport's); logs the transfer."""
        target = torch.device(device) if device is not None else self.device
        k, v = _from_bytes(k_bytes, layout).to(target), _from_bytes(v_bytes, layout).to(target)
        stats = TransferStats(k_bytes.numel() + v_bytes.numel(), time.perf_counter() - start)
        _log_transfer(self.name, "received from", peer, transfer_id, stats)
        return k, v


def make_transport(kind: str, *, rank: int, world_size: int, init_method: str | None,
                   device: str | torch.device, timeout_s: float = 30.0) -> KVTransport:
    """The transport `kind` for the instance process of `rank` (of `world_size`). gloo and nccl
    join the process group at `init_method` (e.g. tcp://host:port; every rank must call this, once,
    at instance start; init waits up to max(timeout_s, 300 s) for all ranks, which is also NCCL's
    watchdog timeout). `timeout_s` is the deadline of each gloo send, counted from start_send;
    recv and finish_send take their own."""
    if kind not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {kind!r}; choose one of {', '.join(TRANSPORTS)}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if kind == "shm":
        return ShmTransport(device)
    if kind == "cuda_ipc":
        return CudaIpcTransport(device)
    if init_method is None:
        raise ValueError(f"the {kind} KV transport needs an init_method (e.g. tcp://127.0.0.1:29500)")
    if kind == "gloo":
        return GlooTransport(rank, world_size, init_method, device, timeout_s)
    return NcclTransport(rank, world_size, init_method, device, timeout_s)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the backends


@dataclass
class _Layout:
    shape: list[int]
    dtype: torch.dtype
    tensor_nbytes: int  # of K (and of V)


def _kv_layout(k: torch.Tensor, v: torch.Tensor) -> _Layout:
    if k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
        raise ValueError(f"K and V must match: K is {tuple(k.shape)} {k.dtype} on {k.device}, "
                         f"V is {tuple(v.shape)} {v.dtype} on {v.device}")
    if k.numel() == 0:
        raise ValueError(f"nothing to transfer: K and V are empty {tuple(k.shape)}")
    return _Layout(list(k.shape), k.dtype, k.numel() * k.element_size())


def _descriptor(transport: str, layout: _Layout, **extra) -> dict:
    return {"transport": transport, "shape": layout.shape, "dtype": str(layout.dtype).removeprefix("torch."),
            "nbytes": 2 * layout.tensor_nbytes, **extra}


def _parse_descriptor(descriptor: dict, transport: str, keys: tuple[str, ...] = ()) -> _Layout:
    if not isinstance(descriptor, dict):
        raise ValueError(f"a KV descriptor must be a dict, got {type(descriptor).__name__}")
    if descriptor.get("transport") != transport:
        raise ValueError(f"descriptor of transport {descriptor.get('transport')!r} given to the {transport} transport")
    missing = [key for key in ("shape", "dtype", "nbytes", *keys) if key not in descriptor]
    if missing:
        raise ValueError(f"KV descriptor lacks {', '.join(missing)}: {descriptor!r}")
    dtype = getattr(torch, str(descriptor["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"KV descriptor has an unknown dtype {descriptor['dtype']!r}")
    shape = descriptor["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"KV descriptor has a bad shape {shape!r}")
    numel = 1
    for d in shape:
        numel *= d
    tensor_nbytes = numel * dtype.itemsize
    if descriptor["nbytes"] != 2 * tensor_nbytes:
        raise ValueError(f"KV descriptor says {descriptor['nbytes']} bytes, but 2 x {shape} of {dtype} "
                         f"is {2 * tensor_nbytes}")
    return _Layout(shape, dtype, tensor_nbytes)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (bfloat16 has no numpy dtype; bytes work for all)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(buf: torch.Tensor, layout: _Layout) -> torch.Tensor:
    return buf.view(layout.dtype).view(layout.shape)


def _check_transfer_id(transfer_id: int) -> None:
    if not isinstance(transfer_id, int) or transfer_id < 0:
        raise ValueError(f"transfer_id must be a non-negative int, got {transfer_id!r}")


def _log_transfer(transport: str, direction: str, peer: int, transfer_id: int, stats: TransferStats) -> None:
    logger.debug("kv %s %s rank %d transfer %d: %d bytes in %.3f ms (%.2f GB/s)", transport, direction, peer,
                 transfer_id, stats.nbytes, stats.seconds * 1e3, stats.gb_per_s)


def _init_process_group(backend: str, init_method: str, rank: int, world_size: int, timeout_s: float) -> bool:
    """Join the cluster's process group unless this process already did; True if we made it."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_rank() != rank or dist.get_world_size() != world_size:
            raise ValueError(f"this process is already rank {dist.get_rank()} of {dist.get_world_size()}, "
                             f"not rank {rank} of {world_size}")
        return False
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=max(timeout_s, _MIN_INIT_TIMEOUT_S)))
    return True


def _wait_work(work, deadline: float) -> None:
    """Wait for a torch.distributed work until `deadline` (time.monotonic). Even past the deadline we
    wait a little instead of not at all: the timeout is what makes the backend drop the op."""
    left = max(deadline - time.monotonic(), 0.001)
    if work.wait(timedelta(seconds=left)) is False:
        raise RuntimeError("the operation did not complete")


def _check_peer(peer: int, rank: int, world_size: int) -> None:
    if not isinstance(peer, int) or not 0 <= peer < world_size or peer == rank:
        raise ValueError(f"peer {peer!r} is not another rank of this world of {world_size} (this is rank {rank})")


# ---------------------------------------------------------------------------------------------
# shm: POSIX shared memory on one host


def _untrack(shm) -> None:
    """Take a segment away from this process's resource_tracker, which would otherwise unlink it when
    the process exits and warn about "leaked" segments (Python < 3.13 has no track=False)."""
    from multiprocessing import resource_tracker

    resource_tracker.unregister(shm._name, "shared_memory")


def _unlink(shm) -> None:
    """Unlink an attached segment; attaching registered it with the tracker, so unregister it even
    when someone else unlinked it first."""
    try:
        shm.unlink()  # unregisters too
    except FileNotFoundError:
        _untrack(shm)


def _allocate(shm, nbytes: int) -> None:
    """Give the segment its memory now: a full /dev/shm then raises here instead of killing the
    process with SIGBUS on the copy, and the copy runs ~2x faster (no page allocation per fault)."""
    fd = getattr(shm, "_fd", -1)
    if fd < 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        raise KVTransferError(f"no room for {nbytes} bytes of KV in shared memory ({e}); "
                              f"enlarge /dev/shm (docker: --shm-size)") from e


def _unlink_segment(name: str) -> bool:
    from multiprocessing import shared_memory

    try:
        shm = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        return False
    shm.close()
    _unlink(shm)
    return True


@dataclass
class _ShmSend:
    peer: int
    name: str
    stats: TransferStats


class ShmTransport(KVTransport):
    name = "shm"

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        # Segment names start with a random token: no collision with other processes' segments.
        self.name_prefix = f"tikv{secrets.token_hex(4)}_"
        self._lock = threading.Lock()
        self._sends: dict[int, _ShmSend] = {}

    def segment_name(self, transfer_id: int) -> str:
        return f"{self.name_prefix}{transfer_id:x}"  # short: macOS allows 31 characters

    def start_send(self, peer: int, transfer_id: int, k: torch.Tensor, v: torch.Tensor) -> dict:
        from multiprocessing import shared_memory

        _check_transfer_id(transfer_id)
        layout = _kv_layout(k, v)
        name = self.segment_name(transfer_id)
        with self._lock:
            if transfer_id in self._sends:
                raise ValueError(f"transfer {transfer_id} was already started")
        start = time.perf_counter()
        n = layout.tensor_nbytes
        shm = shared_memory.SharedMemory(name=name, create=True, size=2 * n)
        _untrack(shm)
        try:
            _allocate(shm, 2 * n)
            dst = torch.frombuffer(shm.buf, dtype=torch.uint8, count=2 * n)
            dst[:n].copy_(_as_bytes(k))
            dst[n:].copy_(_as_bytes(v))
            del dst  # frees the buffer export so close() can unmap
        except BaseException:
            shm.close()
            _unlink(shm)
            raise
        shm.close()  # the segment stays until someone unlinks it
        stats = TransferStats(2 * n, time.perf_counter() - start)
        with self._lock:
            self._sends[transfer_id] = _ShmSend(peer, name, stats)
        return _descriptor(self.name, layout, name=name)

    def finish_send(self, transfer_id: int, timeout_s: float) -> TransferStats:
        with self._lock:
            send = self._sends.get(transfer_id)
        if send is None:
            raise KVTransferError(f"shm transfer {transfer_id} was not started, or was cancelled")
        _log_transfer(self.name, "sent to", send.peer, transfer_id, send.stats)
        return send.stats

    def recv(self, peer: int, transfer_id: int, descriptor: dict, timeout_s: float,
             device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from multiprocessing import shared_memory

        layout = _parse_descriptor(descriptor, self.name, ("name",))
        name = descriptor["name"]
        start = time.perf_counter()
        try:
            shm = shared_memory.SharedMemory(name=name)
        except FileNotFoundError:
            raise KVTransferError(f"shm segment {name} of transfer {transfer_id} from rank {peer} is gone "
                                  f"(cancelled by the sender, or received already)") from None
        try:
            _unlink(shm)  # at once: the mapping stays valid, and nothing is left if we fail below
            nbytes = 2 * layout.tensor_nbytes
            if shm.size < nbytes:
                raise KVTransferError(f"shm segment {name} holds {shm.size} bytes, the descriptor says {nbytes}")
            out = torch.empty(nbytes, dtype=torch.uint8, device=device or self.device)
            src = torch.frombuffer(shm.buf, dtype=torch.uint8, count=nbytes)
            out.copy_(src)
            del src
        finally:
            try:
                shm.close()
            except BufferError:  # an exception kept `src` alive; the mapping goes with it
                pass
        n = layout.tensor_nbytes
        stats = TransferStats(nbytes, time.perf_counter() - start)
        _log_transfer(self.name, "received from", peer, transfer_id, stats)
        return _from_bytes(out[:n], layout), _from_bytes(out[n:], layout)

    def cancel_send(self, transfer_id: int) -> None:
        with self._lock:
            send = self._sends.pop(transfer_id, None)
        if send is not None:
            _unlink_segment(send.name)

    def release(self, transfer_id: int) -> None:
        self.cancel_send(transfer_id)  # the receiver unlinked it; unlink in case it did not

    def close(self) -> None:
        with self._lock:
            sends, self._sends = list(self._sends.values()), {}
        for send in sends:
            _unlink_segment(send.name)


# ---------------------------------------------------------------------------------------------
# gloo: torch.distributed point to point over TCP


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
        self._owns_group = _init_process_group("gloo", init_method, rank, world_size, timeout_s)
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
        _check_transfer_id(transfer_id)
        _check_peer(peer, self.rank, self.world_size)
        layout = _kv_layout(k, v)
        start = time.perf_counter()
        kb, vb = _as_bytes(k.cpu()), _as_bytes(v.cpu())
        with self._cond:
            if transfer_id in self._sends:
                raise ValueError(f"transfer {transfer_id} was already started")
            gen = self._link(self._tx, self.rank, peer).gen
            send = _GlooSend(peer, gen, kb, vb, start, time.monotonic() + self.timeout_s)
            send.future = self._senders.submit(self._send, transfer_id, send)
            self._sends[transfer_id] = send
        return _descriptor(self.name, layout, gen=gen)

    def _send(self, transfer_id: int, send: _GlooSend) -> TransferStats:
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
                    _wait_work(work, send.deadline)
            except RuntimeError as e:
                self._fail(link, send.gen)
                raise KVTransferError(f"gloo transfer {transfer_id} to rank {send.peer} failed: {e}") from e
            stats = TransferStats(send.k.numel() + send.v.numel(), time.perf_counter() - send.start)
        except KVTransferError as e:
            logger.warning("%s", e)
            raise
        finally:
            send.k = send.v = None
        _log_transfer(self.name, "sent to", send.peer, transfer_id, stats)
        return stats

    def finish_send(self, transfer_id: int, timeout_s: float) -> TransferStats:
        """Waits for the send's thread. Optional: a sender that learns of the transfer's end from the
        receiver (KVDone) may call release() instead."""
        with self._cond:
            send = self._sends.pop(transfer_id, None)
        if send is None:
            raise KVTransferError(f"gloo transfer {transfer_id} was not started, or was cancelled")
        try:
            return send.future.result(timeout=timeout_s)
        except FutureTimeoutError:
            raise KVTransferError(f"gloo transfer {transfer_id} to rank {send.peer} is not done after {timeout_s} s; "
                                  f"it goes on until its own deadline") from None
        except CancelledError:
            raise KVTransferError(f"gloo transfer {transfer_id} was cancelled") from None

    def recv(self, peer: int, transfer_id: int, descriptor: dict, timeout_s: float,
             device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        deadline = time.monotonic() + timeout_s
        _check_peer(peer, self.rank, self.world_size)
        layout = _parse_descriptor(descriptor, self.name, ("gen",))
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
                _wait_work(work, deadline)
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


# ---------------------------------------------------------------------------------------------
# nccl: torch.distributed point to point between GPUs


@dataclass
class _NcclSend:
    peer: int
    works: list
    nbytes: int
    start: float


class NcclTransport(KVTransport):
    name = "nccl"

    def __init__(self, rank: int, world_size: int, init_method: str, device: str | torch.device,
                 timeout_s: float = 30.0):
        import torch.distributed as dist

        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"the nccl KV transport needs a CUDA device, got {device!r}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(self.device)
        self._owns_group = _init_process_group("nccl", init_method, rank, world_size, timeout_s)
        if dist.get_backend() != "nccl":
            raise ValueError(f"the process group uses {dist.get_backend()}, the nccl KV transport needs nccl")
        self._cond = threading.Condition()
        self._send_seq: dict[int, int] = {}  # per destination: the next send's number
        self._recv_seq: dict[int, int] = {}  # per source: the number of the next send to receive
        self._sends: dict[int, _NcclSend] = {}
        self._broken: dict[int, str] = {}  # peer -> why
        self._connect_all()

    def _connect_all(self) -> None:
        """Create every pair's communicator now, pair by pair in one global order (no deadlock), so
        that start_send never blocks on a peer that has not called recv yet."""
        import torch.distributed as dist

        one = torch.zeros(1, device=self.device)
        for a in range(self.world_size):
            for b in range(a + 1, self.world_size):
                if self.rank == a:
                    dist.send(one, b)
                elif self.rank == b:
                    dist.recv(one, a)
        torch.cuda.synchronize(self.device)

    def _check_usable(self, peer: int) -> None:
        _check_peer(peer, self.rank, self.world_size)
        if peer in self._broken:
            raise KVTransferError(f"the nccl connection with rank {peer} is broken ({self._broken[peer]}); "
                                  f"restart one of the two instances")

    def start_send(self, peer: int, transfer_id: int, k: torch.Tensor, v: torch.Tensor) -> dict:
        import torch.distributed as dist

        _check_transfer_id(transfer_id)
        layout = _kv_layout(k, v)
        start = time.perf_counter()
        kb, vb = _as_bytes(k.to(self.device)), _as_bytes(v.to(self.device))
        with self._cond:  # posting under the lock keeps the numbering in posting order
            self._check_usable(peer)
            if transfer_id in self._sends:
                raise ValueError(f"transfer {transfer_id} was already started")
            seq = self._send_seq.get(peer, 0)
            self._send_seq[peer] = seq + 1
            works = [dist.isend(kb, peer), dist.isend(vb, peer)]
            self._sends[transfer_id] = _NcclSend(peer, works, 2 * layout.tensor_nbytes, start)
        return _descriptor(self.name, layout, seq=seq)

    def _fail(self, peer: int, why: str) -> None:
        with self._cond:
            self._broken.setdefault(peer, why)
            self._cond.notify_all()

    def finish_send(self, transfer_id: int, timeout_s: float) -> TransferStats:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            send = self._sends.pop(transfer_id, None)
        if send is None:
            raise KVTransferError(f"nccl transfer {transfer_id} was not started, or was cancelled")
        try:
            for work in send.works:
                _wait_work(work, deadline)  # with a timeout, NCCL's wait blocks until the op is done
        except RuntimeError as e:
            self._fail(send.peer, f"transfer {transfer_id} failed: {e}")
            raise KVTransferError(f"nccl transfer {transfer_id} to rank {send.peer} failed: {e}") from e
        stats = TransferStats(send.nbytes, time.perf_counter() - send.start)
        _log_transfer(self.name, "sent to", send.peer, transfer_id, stats)
        return stats

    def recv(self, peer: int, transfer_id: int, descriptor: dict, timeout_s: float,
             device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.distributed as dist

        deadline = time.monotonic() + timeout_s
        layout = _parse_descriptor(descriptor, self.name, ("seq",))
        seq = descriptor["seq"]
        start = time.perf_counter()
        n = layout.tensor_nbytes
        kb = torch.empty(n, dtype=torch.uint8, device=self.device)
        vb = torch.empty(n, dtype=torch.uint8, device=self.device)
        with self._cond:
            while True:  # post in the sender's order: NCCL matches by order, not by tag
                self._check_usable(peer)
                expected = self._recv_seq.get(peer, 0)
                if seq < expected:
                    raise KVTransferError(f"nccl transfer {transfer_id} from rank {peer} (send #{seq}) was "
                                          f"received already; expected #{expected}")
                if seq == expected:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KVTransferError(f"nccl transfer {transfer_id} from rank {peer} (send #{seq}) timed out "
                                          f"waiting for send #{expected} to be received first")
                self._cond.wait(left)
            works = [dist.irecv(kb, peer), dist.irecv(vb, peer)]
            self._recv_seq[peer] = seq + 1
            self._cond.notify_all()
        try:
            for work in works:
                _wait_work(work, deadline)  # with a timeout, NCCL's wait blocks until the op is done
        except RuntimeError as e:
            self._fail(peer, f"transfer {transfer_id} failed: {e}")
            raise KVTransferError(f"nccl transfer {transfer_id} from rank {peer} failed: {e}") from e
        return self._received(peer, transfer_id, kb, vb, layout, device, start)

    def cancel_send(self, transfer_id: int) -> None:
        """Forgets the send; a posted NCCL send cannot be taken back, so the receiver must still recv
        it (the tensors stay alive with the op)."""
        with self._cond:
            self._sends.pop(transfer_id, None)

    def release(self, transfer_id: int) -> None:
        self.cancel_send(transfer_id)  # the receiver has it: drop our handles on the op and its tensors

    def close(self) -> None:
        import torch.distributed as dist

        with self._cond:
            self._sends.clear()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


# ---------------------------------------------------------------------------------------------
# cuda_ipc: CUDA IPC between GPUs of one host

# The fields of torch.multiprocessing.reductions.rebuild_cuda_tensor's arguments, in order; the
# descriptor carries them as plain data (the two classes by name) instead of a pickle.
_IPC_FIELDS = ("tensor_cls", "tensor_size", "tensor_stride", "tensor_offset", "storage_cls", "dtype",
               "storage_device", "storage_handle", "storage_size_bytes", "storage_offset_bytes", "requires_grad",
               "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")


def _encode_ipc(reduced: tuple) -> dict:
    """reduce_tensor(t) of a CUDA tensor -> msgpack-able fields."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    fn, args = reduced
    if fn is not rebuild_cuda_tensor or len(args) != len(_IPC_FIELDS):
        raise RuntimeError("this torch shares CUDA tensors in a way the cuda_ipc KV transport does not know")
    fields = dict(zip(_IPC_FIELDS, args))
    fields["tensor_cls"] = fields["tensor_cls"].__name__
    fields["storage_cls"] = fields["storage_cls"].__name__
    fields["dtype"] = str(fields["dtype"]).removeprefix("torch.")
    fields["tensor_size"], fields["tensor_stride"] = list(fields["tensor_size"]), list(fields["tensor_stride"])
    return fields


def _decode_ipc(fields: dict) -> tuple:
    """The arguments of rebuild_cuda_tensor from `_encode_ipc`'s fields."""
    classes = {"Tensor": torch.Tensor, "TypedStorage": torch.storage.TypedStorage,
               "UntypedStorage": torch.UntypedStorage}
    if fields.get("tensor_cls") not in classes or fields.get("storage_cls") not in classes:
        raise ValueError(f"cuda_ipc descriptor names unknown classes {fields.get('tensor_cls')!r}, "
                         f"{fields.get('storage_cls')!r}")
    values = dict(fields)
    values["tensor_cls"], values["storage_cls"] = classes[fields["tensor_cls"]], classes[fields["storage_cls"]]
    values["dtype"] = getattr(torch, str(fields.get("dtype")), None)
    if not isinstance(values["dtype"], torch.dtype):
        raise ValueError(f"cuda_ipc descriptor has an unknown dtype {fields.get('dtype')!r}")
    values["tensor_size"], values["tensor_stride"] = torch.Size(fields["tensor_size"]), tuple(fields["tensor_stride"])
    return tuple(values[name] for name in _IPC_FIELDS)


@dataclass
class _IpcSend:
    peer: int
    staging: torch.Tensor
    copied: Any  # torch.cuda.Event after the copy into staging
    nbytes: int
    start: float


class CudaIpcTransport(KVTransport):
    name = "cuda_ipc"

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"the cuda_ipc KV transport needs a CUDA device, got {device!r}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._lock = threading.Lock()
        self._sends: dict[int, _IpcSend] = {}

    def start_send(self, peer: int, transfer_id: int, k: torch.Tensor, v: torch.Tensor) -> dict:
        from torch.multiprocessing.reductions import reduce_tensor

        _check_transfer_id(transfer_id)
        layout = _kv_layout(k, v)
        with self._lock:
            if transfer_id in self._sends:
                raise ValueError(f"transfer {transfer_id} was already started")
        start = time.perf_counter()
        n = layout.tensor_nbytes
        with torch.cuda.device(self.device):
            staging = torch.empty(2 * n, dtype=torch.uint8, device=self.device)
            staging[:n].copy_(_as_bytes(k))
            staging[n:].copy_(_as_bytes(v))
            copied = torch.cuda.Event()
            copied.record()
            ipc = _encode_ipc(reduce_tensor(staging))  # records the event the receiver waits on
        with self._lock:
            self._sends[transfer_id] = _IpcSend(peer, staging, copied, 2 * n, start)
        return _descriptor(self.name, layout, ipc=ipc)

    def finish_send(self, transfer_id: int, timeout_s: float) -> TransferStats:
        """Waits for the copy into the staging tensor only; it stays shared until release()."""
        with self._lock:
            send = self._sends.get(transfer_id)
        if send is None:
            raise KVTransferError(f"cuda_ipc transfer {transfer_id} was not started, or was cancelled")
        send.copied.synchronize()
        stats = TransferStats(send.nbytes, time.perf_counter() - send.start)
        _log_transfer(self.name, "staged for", send.peer, transfer_id, stats)
        return stats

    def recv(self, peer: int, transfer_id: int, descriptor: dict, timeout_s: float,
             device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        layout = _parse_descriptor(descriptor, self.name, ("ipc",))
        start = time.perf_counter()
        target = torch.device(device) if device is not None else self.device
        nbytes = 2 * layout.tensor_nbytes
        try:
            shared = rebuild_cuda_tensor(*_decode_ipc(descriptor["ipc"]))
            if shared.numel() != nbytes:
                raise KVTransferError(f"cuda_ipc staging tensor holds {shared.numel()} bytes, expected {nbytes}")
            out = torch.empty(nbytes, dtype=torch.uint8, device=target)
            out.copy_(shared)
            torch.cuda.synchronize(shared.device)  # the copy must be done before the sender frees it
            if target.type == "cuda":
                torch.cuda.synchronize(target)
            del shared
        except RuntimeError as e:  # the sender died or released it: the handle no longer opens
            if isinstance(e, KVTransferError):
                raise
            raise KVTransferError(f"cuda_ipc transfer {transfer_id} from rank {peer} failed: {e}") from e
        n = layout.tensor_nbytes
        stats = TransferStats(nbytes, time.perf_counter() - start)
        _log_transfer(self.name, "received from", peer, transfer_id, stats)
        return _from_bytes(out[:n], layout), _from_bytes(out[n:], layout)

    def cancel_send(self, transfer_id: int) -> None:
        """Drops the staging tensor. A receiver that opens the handle afterwards may read reused
        memory: it must drop a transfer whose KVCancel it got (torch keeps the block alive only for
        receivers that opened it already)."""
        with self._lock:
            send = self._sends.pop(transfer_id, None)
        if send is not None:
            del send
            torch.cuda.ipc_collect()  # frees staging blocks whose receivers have let go

    def release(self, transfer_id: int) -> None:
        self.cancel_send(transfer_id)

    def close(self) -> None:
        with self._lock:
            self._sends.clear()
        torch.cuda.ipc_collect()
