"""``cuda_ipc`` (GPUs of one host): start_send copies K and V into one staging tensor on the sender's
GPU and shares it by CUDA IPC handle; recv opens it and copies to its own device (torch makes the
receiver's stream wait for the sender's copy). The staging tensor lives until `release(transfer_id)`
(the lead calls it when the decode side acknowledges) or `cancel_send`. Every process must see all GPUs
(pick one with device="cuda:i", not with CUDA_VISIBLE_DEVICES), because the handle names the
sender's device index. The descriptor holds the handle's fields, not a pickle, so a receiver
never unpickles bytes from the network.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from tetriinfer.cluster.kv.base import (
    KVTransferError, KVTransport, TransferStats, as_bytes, check_transfer_id, from_bytes, kv_layout, log_transfer,
    make_descriptor, parse_descriptor, wait_event,
)


# The fields of torch.multiprocessing.reductions.rebuild_cuda_tensor's arguments, in order; the
# descriptor carries them as plain data (the two classes by name) instead of a pickle.
IPC_FIELDS = ("tensor_cls", "tensor_size", "tensor_stride", "tensor_offset", "storage_cls", "dtype",
               "storage_device", "storage_handle", "storage_size_bytes", "storage_offset_bytes", "requires_grad",
               "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")


def encode_ipc(reduced: tuple) -> dict:
    """reduce_tensor(t) of a CUDA tensor -> msgpack-able fields."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    fn, args = reduced
    if fn is not rebuild_cuda_tensor or len(args) != len(IPC_FIELDS):
        raise RuntimeError("this torch shares CUDA tensors in a way the cuda_ipc KV transport does not know")
    fields = dict(zip(IPC_FIELDS, args))
    fields["tensor_cls"] = fields["tensor_cls"].__name__
    fields["storage_cls"] = fields["storage_cls"].__name__
    fields["dtype"] = str(fields["dtype"]).removeprefix("torch.")
    fields["tensor_size"], fields["tensor_stride"] = list(fields["tensor_size"]), list(fields["tensor_stride"])
    return fields


def decode_ipc(fields: dict) -> tuple:
    """The arguments of rebuild_cuda_tensor from `encode_ipc`'s fields."""
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
    return tuple(values[name] for name in IPC_FIELDS)


@dataclass
class _IpcSend:
    peer: int
    staging: torch.Tensor  # shared with the receiver until release or cancel_send


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

        check_transfer_id(transfer_id)
        layout = kv_layout(k, v)
        with self._lock:
            if transfer_id in self._sends:
                raise ValueError(f"transfer {transfer_id} was already started")
        n = layout.tensor_nbytes
        with torch.cuda.device(self.device):
            staging = torch.empty(2 * n, dtype=torch.uint8, device=self.device)
            staging[:n].copy_(as_bytes(k))
            staging[n:].copy_(as_bytes(v))
            ipc = encode_ipc(reduce_tensor(staging))  # records the event the receiver waits on
        with self._lock:
            self._sends[transfer_id] = _IpcSend(peer, staging)
        return make_descriptor(self.name, layout, ipc=ipc)

    def recv(self, peer: int, transfer_id: int, descriptor: dict, timeout_s: float,
             device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        deadline = time.monotonic() + timeout_s
        check_transfer_id(transfer_id)
        layout = parse_descriptor(descriptor, self.name, ("ipc",))
        start = time.perf_counter()
        target = torch.device(device) if device is not None else self.device
        nbytes = 2 * layout.tensor_nbytes
        try:
            shared = rebuild_cuda_tensor(*decode_ipc(descriptor["ipc"]))
            if shared.numel() != nbytes:
                raise KVTransferError(f"cuda_ipc staging tensor holds {shared.numel()} bytes, expected {nbytes}")
            out = torch.empty(nbytes, dtype=torch.uint8, device=target)
            out.copy_(shared)
            # The copy must be done before the sender frees the staging tensor (it does on KVDone).
            for dev in {shared.device, target} if target.type == "cuda" else {shared.device}:
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(dev))
                wait_event(done, deadline, f"cuda_ipc transfer {transfer_id} from rank {peer}")
            del shared
        except RuntimeError as e:  # the sender died or released it: the handle no longer opens
            if isinstance(e, KVTransferError):
                raise
            raise KVTransferError(f"cuda_ipc transfer {transfer_id} from rank {peer} failed: {e}") from e
        n = layout.tensor_nbytes
        stats = TransferStats(nbytes, time.perf_counter() - start)
        log_transfer(self.name, "received from", peer, transfer_id, stats)
        return from_bytes(out[:n], layout), from_bytes(out[n:], layout)

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
