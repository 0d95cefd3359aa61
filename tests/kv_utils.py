"""Shared by the KV transfer tests: deterministic K/V tensors, a bitwise check, shm segments."""

from __future__ import annotations

import glob
import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ODD = (3, 37, 2, 5)  # layers, tokens, kv heads, head dim


def make_kv(seed: int, shape=ODD, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    return k.to(device), v.to(device)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.cpu().contiguous().view(torch.uint8), b.cpu().contiguous().view(torch.uint8)))


def check_kv(got, seed, shape, dtype, what=""):
    k, v = make_kv(seed, shape, dtype)
    assert bitwise_equal(got[0], k) and bitwise_equal(got[1], v), f"{what}: K/V differ after the transfer"


def shm_segments(prefix: str) -> list[str]:
    return glob.glob(f"/dev/shm/{prefix}*")
