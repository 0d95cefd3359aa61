"""A Triton W8A8 GEMM for the token counts of decode batches (the engine uses it from 2 to 128 tokens).

    y[m, n] = (sum_k x_q[m, k] w_q[n, k]) * s_x[m] * s_w[n]

x_q float8 [M, K] with one scale per token (kernels.fp8_quant.quantize_per_token_triton), w_q float8
[N, K] with one scale per output channel (model.quant.quantize_weight); the FP8 products run on the
tensor cores and both scales are applied in the epilogue. Reference: model.quant.fp8_matmul_ref.

Why beside torch._scaled_mm: at 32 to 256 tokens cuBLAS streams llama3-8b's FP8 projections at 1.3-2.4
TB/s of a 3.0 TB/s H100 (docs/benchmarks/gpu.md, "Swap AB"), since its tiles span 128 tokens. Here
`SWAP` computes the product transposed, (W_q x_q^T)^T: the output channels fill the tensor core's
large M side (64 or 128) and the few tokens its N side, which Hopper allows down to 8.

Hopper's FP8 tensor cores keep fewer bits than float32 while they accumulate: on an H100, summed
over K = 8,320 in the tensor cores, the float32 result was 5e-3 of a row's largest value off the
float32 reference, as coarse as a bfloat16 output's own rounding. With `PROMOTE` (the default)
each BLOCK_K tile's sum starts from zero and is added to a float32 accumulator, as cuBLAS promotes
unless asked for fast accumulation; over one tile the error is 3-6e-4.

Under TRITON_INTERPRET=1 the operands are widened to float32 before the dot (the interpreter has no
FP8 product); e4m3 products are exact in float32, so only the summation order differs from the GPU.
The wrapper does not synchronise with the host, so it captures in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tetriinfer.kernels.store_kv_triton import INTERPRETED

FP8 = torch.float8_e4m3fn


@triton.jit
def _w8a8_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 SWAP: tl.constexpr, UPCAST: tl.constexpr, PROMOTE: tl.constexpr):
    # Program (i, j): output channels [i * BLOCK_N, +BLOCK_N) for tokens [j * BLOCK_M, +BLOCK_M).
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Rows past the edge re-read the first ones (wrapped, not masked: unmasked loads pipeline through shared
    # memory); the epilogue does not store them.
    x_ptrs = xq_ptr + (offs_m % M)[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + (offs_n % N)[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            in_k = offs_k[None, :] < K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=in_k, other=0.0)
            w = tl.load(w_ptrs, mask=in_k, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if SWAP:
            product = tl.trans(x)
            first = w
        else:
            product = tl.trans(w)
            first = x
        if PROMOTE:
            acc += tl.dot(first, product)  # this tile's sum, added in float32
        else:
            acc = tl.dot(first, product, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    x_scale = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    w_scale = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    if SWAP:
        y = acc * w_scale[:, None] * x_scale[None, :]
        out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])
    else:
        y = acc * x_scale[:, None] * w_scale[None, :]
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def w8a8_launch_config(m: int, k: int) -> dict:
    """Constexprs and launch options for m tokens against K = k, from scripts/w8a8_sweep.py on an
    H100 (llama3-8b's projections; docs/benchmarks/gpu.md): up to 32 tokens the swapped product
    with the tokens in one tile; beyond, the plain one, except over a long K (down_proj), where
    the swapped one with 64-token tiles keeps more programs in flight."""
    if m <= 32 or k > 8192:
        return dict(SWAP=True, BLOCK_M=min(64, max(16, 1 << (m - 1).bit_length())), BLOCK_N=64, BLOCK_K=256,
                    num_warps=4, num_stages=4)
    return dict(SWAP=False, BLOCK_M=64 if m <= 64 else 128, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)


def w8a8_matmul(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, out_dtype: torch.dtype,
                **config) -> Tensor:
    """x_q float8 [M, K], x_scale float32 [M, 1] or [M], w_q float8 [N, K], w_scale float32 [N] ->
    [M, N] in out_dtype (bf16/fp16/fp32). `config` overrides w8a8_launch_config (the sweep's grid)."""
    if x_q.dim() != 2 or w_q.dim() != 2 or x_q.shape[1] != w_q.shape[1] or x_q.dtype != FP8 or w_q.dtype != FP8:
        raise ValueError(f"expected float8_e4m3fn x [M, K] and w [N, K], got {x_q.dtype} {tuple(x_q.shape)} "
                         f"and {w_q.dtype} {tuple(w_q.shape)}")
    m, k = x_q.shape
    n = w_q.shape[0]
    if x_scale.numel() != m or w_scale.numel() != n:
        raise ValueError(f"expected {m} token scales and {n} channel scales, got {x_scale.numel()} and {w_scale.numel()}")
    x_q, w_q = (t if t.stride(-1) == 1 else t.contiguous() for t in (x_q, w_q))
    x_scale, w_scale = x_scale.reshape(m).float().contiguous(), w_scale.reshape(n).float().contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    cfg = {**w8a8_launch_config(m, k), **config}
    cfg["EVEN_K"] = k % cfg["BLOCK_K"] == 0
    cfg.setdefault("PROMOTE", True)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
    _w8a8_kernel[grid](x_q, x_scale, w_q, w_scale, out, m, n, k, x_q.stride(0), w_q.stride(0), out.stride(0),
                       UPCAST=INTERPRETED, **cfg)
    return out
