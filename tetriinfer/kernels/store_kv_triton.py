"""Triton version of `store_kv` (contract in attention_ref.store_kv): one program per token, every KV
head; padding slots (< 0) are skipped inside the kernel, so there is no host synchronisation and the
write can be captured in a CUDA graph."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                     cache_stride_block, cache_stride_slot, cache_stride_head,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_P2: tl.constexpr,
                     DIM_P2: tl.constexpr, PAGE_SIZE: tl.constexpr):
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
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("store_kv needs unit stride along head_dim and K/V caches of one layout")
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEADS_P2=triton.next_power_of_2(num_kv_heads),
        DIM_P2=triton.next_power_of_2(head_dim), PAGE_SIZE=k_cache.shape[1],
    )
