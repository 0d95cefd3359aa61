"""Host-to-device copies that never make the host wait for the GPU.

A copy from ordinary (pageable) host memory may synchronise with the stream, which would stall the
CPU behind the step still running there; a copy from pinned memory is queued and returns at once.
"""

from __future__ import annotations

import torch


def pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` in pinned memory where it is bound for a CUDA device (elsewhere unchanged)."""
    return t.pin_memory() if device.type == "cuda" else t


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return pinned(t, device).to(device, non_blocking=True)
