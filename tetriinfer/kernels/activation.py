"""SiLU-and-mul, the gated MLP's activation: a torch reference and a Triton kernel.

x: [T, 2N] holds the fused gate and up projections side by side; the result [T, N] is
silu(gate) * up, computed in float32 and rounded once to x's dtype.
The reference needs no triton; the kernel is built on first use.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["silu_and_mul_ref", "silu_and_mul_triton"]

BLOCK = 1024  # columns per program


def silu_and_mul_ref(x: Tensor, out: Tensor | None = None) -> Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    y = (F.silu(gate) * up).to(x.dtype)
    return y if out is None else out.copy_(y)


@functools.cache
def triton_kernel():
    """The jitted kernel, built on first use so that importing this module needs no triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    return silu_and_mul_kernel


def silu_and_mul_triton(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Same contract as silu_and_mul_ref; grid (row, column block), no host synchronisation."""
    num_tokens, width = x.shape
    if width % 2:
        raise ValueError(f"last dim {width} is not even: expected gate and up side by side")
    n = width // 2
    if out is None:
        out = torch.empty(num_tokens, n, dtype=x.dtype, device=x.device)
    if out.shape != (num_tokens, n):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected ({num_tokens}, {n})")
    if x.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("x and out must have unit stride along the last dim")
    if num_tokens > 0:
        grid = (num_tokens, -(-n // BLOCK))
        triton_kernel()[grid](x, out, x.stride(0), out.stride(0), n, BLOCK=BLOCK, num_warps=4)
    return out
