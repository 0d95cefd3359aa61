"""The KV transport interface (`KVTransport`) and the helpers its backends share.

The control messages travel over ZeroMQ (`KVReady`, `KVPush`, `KVCancel` in `cluster.messages`); the
tensor bytes travel through a `KVTransport`, one per instance process:

    decode : reserve blocks, send KVReady(transfer_id)
    prefill: descriptor = t.start_send(dst_rank, transfer_id, k, v); send KVPush(descriptor)
    decode : k, v = t.recv(src_rank, transfer_id, descriptor, timeout_s)  # blocks: worker thread
             write k, v into the reserved blocks, then tell the prefill (KVDone)
    prefill: t.release(transfer_id) on KVDone;
             t.cancel_send(transfer_id) instead when it gives up (timeout, failure, abort)

Every started send must end in release or cancel_send (each frees what the transport
keeps for it); until then the sender must not modify K and V. K and V are each [num_layers,
num_tokens, kv_heads, head_dim] of one dtype, on the instance's device; the descriptor is plain
msgpack data, checked before use (its transport, dtype, shape and size; shm: the segment name the
cluster's own naming gives that transfer). Every wait has a deadline: a transfer that times out,
whose peer died or whose data is gone raises `KVTransferError` on each side within about its
timeout, and leaves nothing behind that could leak or corrupt the next transfer.

Backends, one module each: `kv.shm` (one host, CPU), `kv.gloo` (torch.distributed over TCP),
`kv.nccl` (GPUs), `kv.cuda_ipc` (GPUs of one host); `kv.make_transport` picks one.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import timedelta

import torch

from tetriinfer.config import KV_TRANSPORTS

logger = logging.getLogger("tetriinfer.kv")

TRANSPORTS = tuple(name for name in KV_TRANSPORTS if name != "auto")  # "auto" is resolved by the launcher

# The process group waits at least this long for all ranks at init: instances load their models
# at different speeds.
MIN_INIT_TIMEOUT_S = 300.0


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
    def recv(self, peer: int, transfer_id: int, descriptor: dict, timeout_s: float,
             device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Receive K and V sent by rank `peer`, on `device` (default: the transport's device)."""

    @abstractmethod
    def cancel_send(self, transfer_id: int) -> None:
        """Give up a started send and free what it holds; idempotent."""

    def release(self, transfer_id: int) -> None:
        """The receiver acknowledged the transfer: drop what the sender kept for it (shm: the
        segment if still there; cuda_ipc: the staging tensor; gloo, nccl: the finished send's
        tensors). Idempotent."""

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
        k, v = from_bytes(k_bytes, layout).to(target), from_bytes(v_bytes, layout).to(target)
        stats = TransferStats(k_bytes.numel() + v_bytes.numel(), time.perf_counter() - start)
        log_transfer(self.name, "received from", peer, transfer_id, stats)
        return k, v


# ---------------------------------------------------------------------------------------------
# Helpers shared by the backends


@dataclass
class Layout:
    shape: list[int]
    dtype: torch.dtype
    tensor_nbytes: int  # of K (and of V)


def kv_layout(k: torch.Tensor, v: torch.Tensor) -> Layout:
    if k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
        raise ValueError(f"K and V must match: K is {tuple(k.shape)} {k.dtype} on {k.device}, "
                         f"V is {tuple(v.shape)} {v.dtype} on {v.device}")
    if k.numel() == 0:
        raise ValueError(f"nothing to transfer: K and V are empty {tuple(k.shape)}")
    return Layout(list(k.shape), k.dtype, k.numel() * k.element_size())


def make_descriptor(transport: str, layout: Layout, **extra) -> dict:
    return {"transport": transport, "shape": layout.shape, "dtype": str(layout.dtype).removeprefix("torch."),
            "nbytes": 2 * layout.tensor_nbytes, **extra}


def parse_descriptor(descriptor: dict, transport: str, keys: tuple[str, ...] = ()) -> Layout:
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
    if (not isinstance(shape, list) or len(shape) != 4
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ValueError(f"KV descriptor has a bad shape {shape!r} (layers, tokens, kv heads, head dim)")
    numel = 1
    for d in shape:
        numel *= d
    tensor_nbytes = numel * dtype.itemsize
    if descriptor["nbytes"] != 2 * tensor_nbytes:
        raise ValueError(f"KV descriptor says {descriptor['nbytes']} bytes, but 2 x {shape} of {dtype} "
                         f"is {2 * tensor_nbytes}")
    return Layout(shape, dtype, tensor_nbytes)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (bfloat16 has no numpy dtype; bytes work for all)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def from_bytes(buf: torch.Tensor, layout: Layout) -> torch.Tensor:
    return buf.view(layout.dtype).view(layout.shape)


def check_transfer_id(transfer_id: int) -> None:
    if not isinstance(transfer_id, int) or transfer_id < 0:
        raise ValueError(f"transfer_id must be a non-negative int, got {transfer_id!r}")


def log_transfer(transport: str, direction: str, peer: int, transfer_id: int, stats: TransferStats) -> None:
    logger.debug("kv %s %s rank %d transfer %d: %d bytes in %.3f ms (%.2f GB/s)", transport, direction, peer,
                 transfer_id, stats.nbytes, stats.seconds * 1e3, stats.gb_per_s)


def init_process_group(backend: str, init_method: str, rank: int, world_size: int, timeout_s: float) -> bool:
    """Join the cluster's process group unless this process already did; True if we made it."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_rank() != rank or dist.get_world_size() != world_size:
            raise ValueError(f"this process is already rank {dist.get_rank()} of {dist.get_world_size()}, "
                             f"not rank {rank} of {world_size}")
        return False
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=max(timeout_s, MIN_INIT_TIMEOUT_S)))
    return True


def wait_work(work, deadline: float) -> None:
    """Wait for a torch.distributed work until `deadline` (time.monotonic). Even past the deadline we
    wait a little instead of not at all: the timeout is what makes the backend drop the op."""
    left = max(deadline - time.monotonic(), 0.001)
    if work.wait(timedelta(seconds=left)) is False:
        raise RuntimeError("the operation did not complete")


def wait_event(event, deadline: float, what: str) -> None:
    """Wait for a CUDA event until `deadline` (time.monotonic), polling: torch's synchronize() has
    no timeout. Raises KVTransferError when the GPU has not got there in time."""
    delay = 0.0001
    while not event.query():
        if time.monotonic() >= deadline:
            raise KVTransferError(f"{what}: the GPU did not finish in time")
        time.sleep(delay)
        delay = min(2 * delay, 0.01)


def check_peer(peer: int, rank: int, world_size: int) -> None:
    if not isinstance(peer, int) or not 0 <= peer < world_size or peer == rank:
        raise ValueError(f"peer {peer!r} is not another rank of this world of {world_size} (this is rank {rank})")
