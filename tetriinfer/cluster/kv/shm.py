"""``shm``: POSIX shared memory between instance processes of one host (CPU).

start_send copies K and V into one shared-memory segment (Linux: a file in /dev/shm, allocated up
front); recv maps it, unlinks it at once and copies out. The segment belongs to nobody's `resource_tracker` (a tracker would unlink it when the
sender exits, before the receiver read it); cancel_send, release and close unlink it if the
receiver has not.

Names. Every segment of a cluster is named `tikv<cluster_id>_<sender rank>_<transfer id>` (hex), so
the receiver knows the one name a transfer from a given rank may have and opens nothing else: a
descriptor naming any other file (say, one a forged KVPush chose to make it unlink) is rejected
before /dev/shm is touched. All instances of a cluster share its `cluster_id` (cluster.zmq_io.Wire).
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from dataclasses import dataclass

import torch

from tetriinfer.cluster.kv.base import (
    KVTransferError, KVTransport, TransferStats, as_bytes, check_transfer_id, from_bytes, kv_layout, log_transfer,
    logger, make_descriptor, parse_descriptor,
)

_CLUSTER_ID = re.compile(r"[0-9a-f]{1,16}")
_SHM_DIR = "/dev/shm"



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


def cluster_prefix(cluster_id: str) -> str:
    """What every shm segment name of the cluster `cluster_id` starts with (and nothing else's)."""
    if not isinstance(cluster_id, str) or not _CLUSTER_ID.fullmatch(cluster_id):
        raise ValueError(f"an shm cluster id is 1 to 16 lowercase hex digits, got {cluster_id!r}")
    return f"tikv{cluster_id}_"


def remove_segments(prefix: str) -> list[str]:
    """Unlink every segment whose name starts with `prefix` (Linux lists them in /dev/shm; elsewhere
    nothing is found); returns their names."""
    names = [name for name in (os.listdir(_SHM_DIR) if os.path.isdir(_SHM_DIR) else []) if name.startswith(prefix)]
    return [name for name in names if _unlink_segment(name)]


@dataclass
class _ShmSend:
    peer: int
    name: str


class ShmTransport(KVTransport):
    name = "shm"

    def __init__(self, device: str | torch.device = "cpu", *, rank: int = 0, cluster_id: str | None = None,
                 remove_stale: bool = False):
        """`cluster_id` (hex) names the cluster's segments; None: a random one (this process alone).
        `remove_stale`: unlink what an earlier process of this rank left (it died mid-transfer;
        the supervisor started this one in its place), so no name is taken and nothing leaks."""
        self.device = torch.device(device)
        self.rank = rank
        self.name_prefix = cluster_prefix(secrets.token_hex(4) if cluster_id is None else cluster_id)
        self._lock = threading.Lock()
        self._sends: dict[int, _ShmSend] = {}
        if remove_stale:
            stale = remove_segments(f"{self.name_prefix}{rank:x}_")
            if stale:
                logger.warning("shm: removed %d segment(s) left by an earlier process of rank %d", len(stale), rank)

    def segment_name(self, transfer_id: int, sender: int | None = None) -> str:
        """The one name of `transfer_id` sent by rank `sender` (default: this one). Short: macOS
        allows 31 characters."""
        return f"{self.name_prefix}{self.rank if sender is None else sender:x}_{transfer_id:x}"

    def start_send(self, peer: int, transfer_id: int, k: torch.Tensor, v: torch.Tensor) -> dict:
        from multiprocessing import shared_memory

        check_transfer_id(transfer_id)
        layout = kv_layout(k, v)
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
            dst[:n].copy_(as_bytes(k))
            dst[n:].copy_(as_bytes(v))
            del dst  # frees the buffer export so close() can unmap
        except BaseException:
            shm.close()
            _unlink(shm)
            raise
        shm.close()  # the segment stays until someone unlinks it
        log_transfer(self.name, "sent to", peer, transfer_id, TransferStats(2 * n, time.perf_counter() - start))
        with self._lock:
            self._sends[transfer_id] = _ShmSend(peer, name)
        return make_descriptor(self.name, layout, name=name)

    def recv(self, peer: int, transfer_id: int, descriptor: dict, timeout_s: float,
             device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from multiprocessing import shared_memory

        check_transfer_id(transfer_id)
        if not isinstance(peer, int) or peer < 0:
            raise ValueError(f"peer must be a non-negative int, got {peer!r}")
        layout = parse_descriptor(descriptor, self.name, ("name",))
        name = self.segment_name(transfer_id, peer)
        if descriptor["name"] != name:
            raise ValueError(f"shm segment {descriptor['name']!r} is not transfer {transfer_id} from rank {peer} "
                             f"of this cluster (that is {name!r}): refused")
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
        log_transfer(self.name, "received from", peer, transfer_id, stats)
        return from_bytes(out[:n], layout), from_bytes(out[n:], layout)

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
