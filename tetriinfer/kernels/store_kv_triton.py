"""Triton version of `store_kv` (contract in attention_ref.store_kv): one program per token, every KV
head; padding slots (< 0) are skipped inside the kernel, so there is no host synchronisation and the
write can be captured in a CUDA graph.

An FP8 cache (torch.float8_e4m3fn = tl.float8e4nv) stores e4m3(clamp(x * (1 / scale), -448, 448)),
as attention_ref.to_cache_dtype does; `quantize_kv` is that conversion as a Triton function, for any
kernel that writes the cache (rope's fused rotation + store too). 16- and 32-bit caches keep the plain
cast (a constexpr branch: their code is unchanged).

Under TRITON_INTERPRET=1 the interpreter's float32 -> float8 cast rounds wrongly (it adds the first
cut-off bit without ties-to-even and without carrying into the exponent: 124.0 comes out as 64.0), so
there the value is first rounded to the e4m3 grid in float32 (round to nearest even, as the GPU's
cvt.rn.satfinite does), after which the cast is exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from tetriinfer.kernels.attention_ref import FP8, check_kv_scales


@triton.jit
def _round_to_e4m3_grid(y):
    """y (float32, |y| <= 448 or NaN) rounded to the nearest e4m3 value, ties to even, still float32.

    Adding then subtracting 1.5 * 2**23 ulps rounds to a multiple of the ulp in float32's own
    round-to-nearest-even; the ulp of e4m3 at |y| is 2**(exponent - 3), 2**-9 below the normal range.
    """
    bits = y.to(tl.uint32, bitcast=True)
    biased_exp = ((bits >> 23) & 0xFF).to(tl.int32)
    ulp_biased_exp = tl.maximum(biased_exp, 127 - 6) - 3
    magic = (((ulp_biased_exp + 23) << 23) | 0x400000).to(tl.uint32).to(tl.float32, bitcast=True)
    a = tl.abs(y)
    rounded = (a + magic) - magic
    rounded = tl.where((bits >> 31) != 0, -rounded, rounded)  # keeps -0.0 as torch does
    return tl.where(y != y, y, rounded)


@triton.jit
def quantize_kv(x, inv_scale, CACHE_DTYPE: tl.constexpr, EMULATE_FP8_ROUNDING: tl.constexpr):
    """x as the cache stores it: for an FP8 cache e4m3(clamp(x * inv_scale, +-448)), NaN kept; for any
    other cache a plain cast (inv_scale unused). EMULATE_FP8_ROUNDING: True under the interpreter."""
    if CACHE_DTYPE == tl.float8e4nv:
        y = x.to(tl.float32) * inv_scale
        y = tl.clamp(y, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        if EMULATE_FP8_ROUNDING:
            y = _round_to_e4m3_grid(y)
            quantized = y.to(CACHE_DTYPE)
            # The interpreter casts float32 NaN to 256.0; e4m3's NaN is 0x7F.
            nan = tl.full(y.shape, 0x7F, tl.uint8).to(CACHE_DTYPE, bitcast=True)
            return tl.where(y != y, nan, quantized)
        else:
            return y.to(CACHE_DTYPE)
    else:
        return x.to(CACHE_DTYPE)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_inv_scale, v_inv_scale,
                     k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                     cache_stride_block, cache_stride_slot, cache_stride_head,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_P2: tl.constexpr,
                     DIM_P2: tl.constexpr, PAGE_SIZE: tl.constexpr, EMULATE_FP8_ROUNDING: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        block = slot // PAGE_SIZE
        offset = slot % PAGE_SIZE
        heads = tl.arange(0, HEADS_P2)[:, None]
        dims = tl.arange(0, DIM_P2)[None, :]
        mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
        dst = block * cache_stride_block + offset * cache_stride_slot + heads * cache_stride_head + dims
        k = tl.load(k_ptr + token * k_stride_t + heads * k_stride_h + dims, mask=mask)
        v = tl.load(v_ptr + token * v_stride_t + heads * v_stride_h + dims, mask=mask)
        k = quantize_kv(k, k_inv_scale, k_cache_ptr.dtype.element_ty, EMULATE_FP8_ROUNDING)
        v = quantize_kv(v, v_inv_scale, v_cache_ptr.dtype.element_ty, EMULATE_FP8_ROUNDING)
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)


# Under TRITON_INTERPRET=1 (CPU tests), triton.jit builds an InterpretedFunction.
INTERPRETED = isinstance(_store_kv_kernel, InterpretedFunction)


def inv_scale(scale: float) -> float:
    """What the kernels multiply by to quantize (passed as float32, as torch rounds a Python scalar)."""
    return 1.0 / scale


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    check_kv_scales(k_cache.dtype, k_scale, v_scale)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("store_kv needs unit stride along head_dim and K/V caches of one layout")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"K cache {k_cache.dtype} and V cache {v_cache.dtype} differ")
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, inv_scale(k_scale), inv_scale(v_scale),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEADS_P2=triton.next_power_of_2(num_kv_heads),
        DIM_P2=triton.next_power_of_2(head_dim), PAGE_SIZE=k_cache.shape[1],
        EMULATE_FP8_ROUNDING=INTERPRETED and k_cache.dtype == FP8,
    )


__all__ = ["store_kv", "quantize_kv", "inv_scale"]
