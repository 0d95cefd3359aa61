"""Moving one request's KV cache from a prefill instance process to a decode instance process.

`make_transport` builds an instance's `KVTransport` (the protocol: `kv.base`); one module per
backend: `shm` (one host, CPU), `gloo` (torch.distributed over TCP), `nccl` (GPUs), `cuda_ipc`
(GPUs of one host).
"""

from __future__ import annotations

import torch

from tetriinfer.cluster.kv.base import TRANSPORTS, KVTransferError, KVTransport, TransferStats
from tetriinfer.cluster.kv.cuda_ipc import CudaIpcTransport
from tetriinfer.cluster.kv.gloo import GlooTransport
from tetriinfer.cluster.kv.nccl import NcclTransport
from tetriinfer.cluster.kv.shm import ShmTransport

__all__ = ["TRANSPORTS", "CudaIpcTransport", "GlooTransport", "KVTransferError", "KVTransport", "NcclTransport",
           "ShmTransport", "TransferStats", "make_transport"]


def make_transport(kind: str, *, rank: int, world_size: int, init_method: str | None,
                   device: str | torch.device, timeout_s: float = 30.0, cluster_id: str | None = None) -> KVTransport:
    """The transport `kind` for the instance process of `rank` (of `world_size`). gloo and nccl
    join the process group at `init_method` (e.g. tcp://host:port; every rank must call this, once,
    at instance start; init waits up to max(timeout_s, 300 s) for all ranks, which is also NCCL's
    watchdog timeout). `timeout_s` is the deadline of each gloo send, counted from start_send;
    recv takes its own. shm names its segments after `cluster_id` (the same for
    every rank: cluster.zmq_io.Wire.cluster_id) and accepts no other name."""
    if kind not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {kind!r}; choose one of {', '.join(TRANSPORTS)}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if kind == "shm":
        if cluster_id is None:
            raise ValueError("the shm KV transport needs the cluster's id (its segments' names)")
        return ShmTransport(device, rank=rank, cluster_id=cluster_id, remove_stale=True)
    if kind == "cuda_ipc":
        return CudaIpcTransport(device)
    if init_method is None:
        raise ValueError(f"the {kind} KV transport needs an init_method (e.g. tcp://127.0.0.1:29500)")
    if kind == "gloo":
        return GlooTransport(rank, world_size, init_method, device, timeout_s)
    return NcclTransport(rank, world_size, init_method, device, timeout_s)
