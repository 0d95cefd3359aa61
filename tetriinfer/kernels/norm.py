"""RMSNorm, optionally fused with the residual add before it: a torch reference and a Triton kernel.

Both follow Hugging Face's LlamaRMSNorm order of operations: the mean of squares and the scaling in
float32, the result rounded to the input dtype, then multiplied by the weight (in the promoted dtype
of input and weight). With a residual, `s = x + residual` is taken in the model dtype, as the
residual stream is, and `(rms_norm(s), s)` is returned.
The reference needs no triton; the kernel is built on first use.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["rms_norm_ref", "rms_norm_triton"]

MAX_HIDDEN_SIZE = 16384  # one row lives in one program's registers


def rms_norm_ref(
    x: Tensor,
    weight: Tensor,
    eps: float,
    residual: Tensor | None = None,
    out: Tensor | None = None,
    residual_out: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """x: [T, H], weight: [H]. Returns rms_norm(x), or (rms_norm(x + residual), x + residual).

    `out` / `residual_out` receive the results if given (either may alias x or residual).
    """
    if residual is not None:
        x = x + residual
        if residual_out is not None:
            x = residual_out.copy_(x)
    normed = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if out is not None:
        normed = out.copy_(normed)
    return normed if residual is None else (normed, x)


@functools.cache
def triton_kernel():
    """The jitted kernel, built on first use so that importing this module needs no triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_kernel(
        x_ptr,
        residual_ptr,
        weight_ptr,
        out_ptr,
        residual_out_ptr,
        stride_x,
        stride_residual,
        stride_out,
        stride_residual_out,
        hidden_size,
        eps,
        BLOCK: tl.constexpr,  # hidden_size rounded up to a power of two
        HAS_RESIDUAL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden_size
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
            # Rounded to the model dtype before the norm reads it, exactly as `x + residual` in torch.
            x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / hidden_size + eps)
        normed = (xf * rstd).to(x_ptr.dtype.element_ty)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        y = normed.to(tl.float32) * weight.to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    return rms_norm_kernel


def launch_config(hidden_size: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of `hidden_size`: about 8 to 32 elements per thread."""
    block = 1 << (hidden_size - 1).bit_length()
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, num_warps


def rms_norm_triton(
    x: Tensor,
    weight: Tensor,
    eps: float,
    residual: Tensor | None = None,
    out: Tensor | None = None,
    residual_out: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as rms_norm_ref; one program per row, no host synchronisation.

    Rows may be strided (x[:, :H] of a wider tensor); the hidden dim must have unit stride.
    `residual_out=residual` updates the residual stream in place.
    """
    num_tokens, hidden_size = x.shape
    if hidden_size > MAX_HIDDEN_SIZE:
        raise ValueError(f"hidden size {hidden_size} is above the kernel's limit of {MAX_HIDDEN_SIZE}")
    if weight.shape != (hidden_size,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({hidden_size},)")
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual is not None:
        if residual.dtype != x.dtype or residual.shape != x.shape:
            raise ValueError("residual must have x's shape and dtype")
        if residual_out is None:
            residual_out = torch.empty_like(x)
    tensors = {"x": x, "weight": weight, "out": out, "residual": residual, "residual_out": residual_out}
    for name, t in tensors.items():
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along the hidden dim")
    if num_tokens > 0:
        # Without a residual the residual pointers are never read: pass x in their place.
        res_in = x if residual is None else residual
        res_out = x if residual is None else residual_out
        block, num_warps = launch_config(hidden_size)
        triton_kernel()[(num_tokens,)](
            x,
            res_in,
            weight,
            out,
            res_out,
            x.stride(0),
            res_in.stride(0),
            out.stride(0),
            res_out.stride(0),
            hidden_size,
            eps,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            num_warps=num_warps,
        )
    return out if residual is None else (out, residual_out)
