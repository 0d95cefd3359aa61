"""Triton kernels for FP8 linear layers (model.quant), each against a torch reference there:

- `quantize_per_token_triton`: model.quant.quantize_per_token in one launch, bit for bit. One program
  per token: the row's amax, scale = max(amax * (1/448), 1e-12), then e4m3(clamp(x / scale, +-448)).
  The division is IEEE (div_rn): Triton's `/` is div.full.f32 (2 ulp), and x * (1 / scale) would
  round differently from torch's `x.float() / scale` in the last bit, which moves e4m3 ties.
  A row holding NaN gets a NaN scale and a NaN row, as torch's NaN-propagating amax gives.
- `w8a16_matmul`: y = (x @ W_q^T) * s_w for a few rows of bf16/fp16 x (decode): FP8 weights
  [N, K] upcast tile by tile (e4m3 is exact in bf16 and fp16), no activation quantization, half the
  weight bytes of bf16. Reference: model.quant.w8a16_matmul_ref.
- `w8a16_gemv`: the same product for at most GEMV_MAX_ROWS rows without tensor cores: each program
  multiplies BLOCK_N weight rows by the tokens in float32 and reduces along K. At one token it
  streams llama3-8b's FP8 projections at 2.2-2.8 TB/s on an H100, where cuBLAS's FP8 GEMM and the
  tensor-core W8A16 GEMM reach 1.3-2.5 (scripts/w8a16_sweep.py, docs/benchmarks/gpu.md).

Neither wrapper synchronises with the host, so both capture in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tetriinfer.kernels.store_kv_triton import INTERPRETED, quantize_kv

__all__ = ["quantize_per_token_triton", "w8a16_matmul", "w8a16_gemv", "quant_launch_config", "w8a16_launch_config",
           "gemv_launch_config"]

FP8 = torch.float8_e4m3fn
MAX_ONE_BLOCK = 16384  # a row up to this many columns is loaded once and kept in registers
LOOP_BLOCK = 4096  # longer rows: one pass for the amax, a second (from L2) to quantize
W8A16_MAX_ROWS = 64  # the GEMM's largest BLOCK_M; model.quant gates it much lower
GEMV_MAX_ROWS = 4  # the GEMV re-reads each weight tile once per row (from L2): a few rows only


@triton.jit
def _to_e4m3(x, scale, EMULATE_FP8_ROUNDING: tl.constexpr):
    # quantize_kv with inv_scale 1.0 (exact) is the clamp + e4m3 cast store_kv uses, interpreter fix included.
    return quantize_kv(tl.math.div_rn(x, scale), 1.0, tl.float8e4nv, EMULATE_FP8_ROUNDING)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, K,
                          BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, EMULATE_FP8_ROUNDING: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        nans = tl.sum((x != x).to(tl.int32), axis=0)
    else:
        amax = 0.0
        nans = 0
        for start in range(0, K, BLOCK):
            xs = tl.load(x_row + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(xs), axis=0))
            nans += tl.sum((xs != xs).to(tl.int32), axis=0)
    # torch: amax.float() / 448 with a Python-scalar divisor, i.e. amax * float32(1 / 448) (quant.py).
    scale = tl.maximum(amax * (1.0 / 448.0), 1e-12)
    scale = tl.where(nans > 0, float("nan"), scale)
    tl.store(scale_ptr + row, scale)
    if ONE_BLOCK:
        tl.store(q_row + cols, _to_e4m3(x, scale, EMULATE_FP8_ROUNDING), mask=cols < K)
    else:
        for start in range(0, K, BLOCK):
            mask = start + cols < K
            xs = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + start + cols, _to_e4m3(xs, scale, EMULATE_FP8_ROUNDING), mask=mask)


def quant_launch_config(k: int) -> tuple[int, bool, int]:
    """(BLOCK, ONE_BLOCK, num_warps) for rows of k columns: 8 to 32 float32 values per thread."""
    if k <= MAX_ONE_BLOCK:
        block = max(16, 1 << (k - 1).bit_length())
        return block, True, 4 if block <= 1024 else 8 if block <= 4096 else 16
    return LOOP_BLOCK, False, 8


def quantize_per_token_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as model.quant.quantize_per_token for x [T, K]: (x_q float8 [T, K], s_x float32 [T, 1])."""
    if x.dim() != 2:
        raise ValueError(f"expected x [tokens, features], got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_tokens, k = x.shape
    if k == 0:
        raise ValueError("cannot quantize rows of zero features (torch's amax of an empty row raises too)")
    x_q = torch.empty(num_tokens, k, dtype=FP8, device=x.device)
    scale = torch.empty(num_tokens, 1, dtype=torch.float32, device=x.device)
    if num_tokens > 0:
        block, one_block, num_warps = quant_launch_config(k)
        _quantize_rows_kernel[(num_tokens,)](x, x_q, scale, x.stride(0), x_q.stride(0), k, BLOCK=block,
                                             ONE_BLOCK=one_block, EMULATE_FP8_ROUNDING=INTERPRETED,
                                             num_warps=num_warps)
    return x_q, scale


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, w_scale_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                  DOT_DTYPE: tl.constexpr):
    # One program per BLOCK_N output columns and all (<= BLOCK_M) rows: the weight is read once.
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m[:, None] < M
    mask_n = offs_n[:, None] < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m, other=0.0)
            w = tl.load(w_ptrs, mask=mask_n, other=0.0)
        else:
            in_k = offs_k[None, :] + k < K
            x = tl.load(x_ptrs, mask=mask_m & in_k, other=0.0)
            w = tl.load(w_ptrs, mask=mask_n & in_k, other=0.0)
        # e4m3 -> bf16/fp16 is exact, and so are the products: only the fp32 sum order differs from torch.
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    w_scale = tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc * w_scale[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m & (offs_n[None, :] < N))


def w8a16_launch_config(m: int, k: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Constexprs and launch options. Up to 16 rows: BLOCK_N 32, BLOCK_K 512, 4 warps, 4 stages, the
    fastest of a 12-config grid on every llama3-8b projection at 16 rows on an H100 (w8a16_sweep.py:
    104 us a layer against 152 at the former BLOCK_N 16, BLOCK_K 256 and 126 for cuBLAS FP8). Larger
    BLOCK_M keeps the former guesses (unmeasured); warps per BLOCK_M chosen so that sm_90 builds do
    not spill (4 warps at BLOCK_M 32 spill, tests/test_fp8_quant_triton.py)."""
    block_m = max(16, 1 << (m - 1).bit_length())
    # The interpreter multiplies bfloat16 as raw bits in tl.dot (see attention_triton): float32 there.
    dot_dtype = tl.float32 if INTERPRETED else tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    if block_m == 16:
        block_n, block_k = 32, 512
    else:
        block_n, block_k = 16, 256 if block_m <= 32 else 128
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, DOT_DTYPE=dot_dtype,
                num_warps=4 if block_m == 16 else 8, num_stages=4)


def _w8a16_operands(x: Tensor, w_q: Tensor, max_rows: int, name: str) -> tuple[Tensor, Tensor]:
    """Both W8A16 wrappers' checks: at most `max_rows` bf16/fp16 rows against float8 [N, K] weights;
    the two made unit-stride along K."""
    if x.shape[0] > max_rows:
        raise ValueError(f"{name} takes at most {max_rows} rows, got {x.shape[0]}")
    if x.dtype not in (torch.bfloat16, torch.float16) or w_q.dtype != FP8 or w_q.shape[1] != x.shape[1]:
        raise ValueError(f"expected bf16/fp16 x [M, K] and float8_e4m3fn w [N, K], got {x.dtype} {tuple(x.shape)} "
                         f"and {w_q.dtype} {tuple(w_q.shape)}")
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (x, w_q))


def w8a16_matmul(x: Tensor, w_q: Tensor, w_scale: Tensor, **config) -> Tensor:
    """x [M, K] bf16/fp16 (M <= 64), w_q float8 [N, K], w_scale float32 [N] -> [M, N] in x's dtype.
    `config` overrides w8a16_launch_config's BLOCK_N, BLOCK_K, num_warps, num_stages (scripts/w8a16_sweep.py)."""
    x, w_q = _w8a16_operands(x, w_q, W8A16_MAX_ROWS, "w8a16_matmul")
    m, k = x.shape
    n = w_q.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    cfg = {**w8a16_launch_config(m, k, x.dtype), **config}
    cfg["EVEN_K"] = k % cfg["BLOCK_K"] == 0
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _w8a16_kernel[grid](x, w_q, w_scale, out, m, n, k, x.stride(0), w_q.stride(0), out.stride(0), **cfg)
    return out


@triton.jit
def _w8a16_gemv_kernel(x_ptr, w_ptr, w_scale_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, K_PER_SPLIT,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAX_ROWS: tl.constexpr, ATOMIC: tl.constexpr):
    # Program (i, j): output columns [i * BLOCK_N, +BLOCK_N) over K slice j. With ATOMIC the slices'
    # float32 partials are summed into a zeroed float32 `out` (order-dependent rounding); else one slice.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(1) * K_PER_SPLIT
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
    for row in tl.static_range(MAX_ROWS):
        if row < M:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
                in_k = offs_k + k < K
                w = tl.load(w_rows + (k + offs_k)[None, :], mask=mask_n[:, None] & in_k[None, :], other=0.0)
                x = tl.load(x_ptr + row * stride_xm + k + offs_k, mask=in_k, other=0.0)
                acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
            y = acc * w_scale
            if ATOMIC:
                tl.atomic_add(out_ptr + row * stride_om + offs_n, y, mask=mask_n)
            else:
                tl.store(out_ptr + row * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)


def gemv_launch_config() -> dict:
    """BLOCK_N 8, BLOCK_K 1024, 4 warps, no split of K: the config with the smallest sum over
    llama3-8b's four projections at one token among 36 on an H100 (w8a16_sweep.py: 87 us a layer,
    within 3% of each projection's own best; cuBLAS FP8 130, bf16 157)."""
    return dict(BLOCK_N=8, BLOCK_K=1024, num_warps=4, num_stages=3)


def w8a16_gemv(x: Tensor, w_q: Tensor, w_scale: Tensor, split_k: int = 1, **config) -> Tensor:
    """x [M, K] bf16/fp16 (M <= GEMV_MAX_ROWS), w_q float8 [N, K], w_scale float32 [N] -> [M, N] in x's
    dtype, as w8a16_matmul. `split_k` > 1 splits K over programs summed by float32 atomics (a zeroed
    buffer and a cast more); `config` overrides gemv_launch_config (scripts/w8a16_sweep.py sweeps it)."""
    x, w_q = _w8a16_operands(x, w_q, GEMV_MAX_ROWS, "w8a16_gemv")
    m, k = x.shape
    n = w_q.shape[0]
    cfg = {**gemv_launch_config(), **config}
    atomic = split_k > 1
    out = (torch.zeros if atomic else torch.empty)(m, n, dtype=torch.float32 if atomic else x.dtype, device=x.device)
    if m and n and k:
        k_per_split = triton.cdiv(triton.cdiv(k, split_k), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, k_per_split))
        _w8a16_gemv_kernel[grid](x, w_q, w_scale, out, m, n, k, x.stride(0), w_q.stride(0), out.stride(0), k_per_split,
                                 MAX_ROWS=GEMV_MAX_ROWS, ATOMIC=atomic, **cfg)
    elif m and n:
        out.zero_()
    return out.to(x.dtype)
