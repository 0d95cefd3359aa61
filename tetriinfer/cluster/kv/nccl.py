"""``nccl`` (GPUs, one host or several): point-to-point over the default NCCL group (release() drops
the finished op and its tensors); the constructor
connects every pair once (all ranks, same order) so that a send never blocks on a connection.
NCCL ignores tags: sends and receives of one pair match in the order they are posted. start_send
posts the sends and numbers them per destination; recv posts in that order (a recv waits for its
turn), so the lead need not order its worker threads, but it must deliver every started send:
once start_send returned, the receiver must recv it (and may drop the result), because a posted
NCCL send cannot be taken back. Do not run transfers in both directions of one pair at once
(their ops share one NCCL stream and can deadlock). A timeout or error is fatal for the pair
(NCCL ops cannot be cancelled); later transfers with that peer raise at once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from tetriinfer.cluster.kv.base import (
    KVTransferError, KVTransport, as_bytes, check_peer, check_transfer_id, init_process_group, kv_layout,
    make_descriptor, parse_descriptor, wait_work,
)


@dataclass
class _NcclSend:
    peer: int
    works: list  # the posted isends; they keep K and V alive until the receiver has them


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
        self._owns_group = init_process_group("nccl", init_method, rank, world_size, timeout_s)
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
        check_peer(peer, self.rank, self.world_size)
        if peer in self._broken:
            raise KVTransferError(f"the nccl connection with rank {peer} is broken ({self._broken[peer]}); "
                                  f"restart one of the two instances")

    def start_send(self, peer: int, transfer_id: int, k: torch.Tensor, v: torch.Tensor) -> dict:
        import torch.distributed as dist

        check_transfer_id(transfer_id)
        layout = kv_layout(k, v)
        kb, vb = as_bytes(k.to(self.device)), as_bytes(v.to(self.device))
        with self._cond:  # posting under the lock keeps the numbering in posting order
            self._check_usable(peer)
            if transfer_id in self._sends:
                raise ValueError(f"transfer {transfer_id} was already started")
            seq = self._send_seq.get(peer, 0)
            self._send_seq[peer] = seq + 1
            works = [dist.isend(kb, peer), dist.isend(vb, peer)]
            self._sends[transfer_id] = _NcclSend(peer, works)
        return make_descriptor(self.name, layout, seq=seq)

    def _fail(self, peer: int, why: str) -> None:
        with self._cond:
            self._broken.setdefault(peer, why)
            self._cond.notify_all()

    def recv(self, peer: int, transfer_id: int, descriptor: dict, timeout_s: float,
             device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.distributed as dist

        deadline = time.monotonic() + timeout_s
        layout = parse_descriptor(descriptor, self.name, ("seq",))
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
                wait_work(work, deadline)  # with a timeout, NCCL's wait blocks until the op is done
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
