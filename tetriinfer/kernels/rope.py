"""Rotary embedding fused into the paged KV-cache write: a torch reference and a Triton kernel.

`rope_store_kv` rotates q and k (rotate-half / GPT-NeoX style, float32 math, rounded to the input
dtype), returns the rotated q and writes the rotated k and the unchanged v into the paged cache at
`slot_mapping` (slot = block * block_size + offset; slot < 0 marks padding, which writes nothing).
The reference is the model's RotaryEmbedding followed by attention_ref.store_kv; the kernel matches
it bit for bit in float32 (it is launched without FMA contraction, as torch's separate ops round
each product).
The reference needs no triton; the kernel is built on first use.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from tetriinfer.kernels.attention_ref import check_kv_scales, store_kv

__all__ = ["apply_rotary", "rope_store_kv_ref", "rope_store_kv_triton"]

MAX_TILE_ELEMENTS = 2048  # heads x half head_dim rotated per loop step of a program


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE of x [..., D] by cos/sin broadcastable to [..., D/2], in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope_store_kv_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    out: Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], positions [T], cos/sin [max_pos, D/2] float32,
    caches [num_blocks, block_size, Hkv, D], slot_mapping [T]. Returns rotated q [T, Hq, D]."""
    cos_t = cos[positions].unsqueeze(1)  # [T, 1, D/2], broadcast over heads
    sin_t = sin[positions].unsqueeze(1)
    store_kv(apply_rotary(k, cos_t, sin_t), v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    q_rot = apply_rotary(q, cos_t, sin_t)
    return q_rot if out is None else out.copy_(q_rot)


@functools.cache
def triton_kernel():
    """The jitted kernel, built on first use so that importing this module needs no triton."""
    import triton
    import triton.language as tl

    # A module global, so the jitted kernel (and the interpreter) can see it.
    global quantize_kv
    from tetriinfer.kernels.store_kv_triton import quantize_kv

    @triton.jit
    def rope_store_kv_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        positions_ptr,
        cos_ptr,
        sin_ptr,
        k_cache_ptr,
        v_cache_ptr,
        slot_mapping_ptr,
        q_out_ptr,
        stride_q_token,
        stride_q_head,
        stride_k_token,
        stride_k_head,
        stride_v_token,
        stride_v_head,
        stride_cos,
        stride_sin,
        stride_q_out_token,
        stride_q_out_head,
        stride_k_cache_block,
        stride_k_cache_offset,
        stride_k_cache_head,
        stride_v_cache_block,
        stride_v_cache_offset,
        stride_v_cache_head,
        k_inv_scale,
        v_inv_scale,
        NUM_Q_HEADS: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr,
        HALF_DIM: tl.constexpr,
        HALF_DIM_P2: tl.constexpr,
        BLOCK_Q_HEADS: tl.constexpr,  # q heads per loop step
        BLOCK_KV_HEADS: tl.constexpr,  # k/v heads per loop step
        PAGE_SIZE: tl.constexpr,  # tokens per KV cache block
        EMULATE_FP8_ROUNDING: tl.constexpr,  # an FP8 cache under TRITON_INTERPRET (store_kv_triton)
    ):
        token = tl.program_id(0).to(tl.int64)
        dims = tl.arange(0, HALF_DIM_P2)
        dim_valid = dims < HALF_DIM
        # int64 offsets even for int32 inputs: a large cache has more than 2**31 elements.
        position = tl.load(positions_ptr + token).to(tl.int64)
        cos = tl.load(cos_ptr + position * stride_cos + dims, mask=dim_valid, other=0.0)[None, :]
        sin = tl.load(sin_ptr + position * stride_sin + dims, mask=dim_valid, other=0.0)[None, :]

        q_heads = tl.arange(0, BLOCK_Q_HEADS)
        for head_start in range(0, NUM_Q_HEADS, BLOCK_Q_HEADS):
            heads = head_start + q_heads
            mask = (heads < NUM_Q_HEADS)[:, None] & dim_valid[None, :]
            q_offsets = token * stride_q_token + heads[:, None] * stride_q_head + dims[None, :]
            q1 = tl.load(q_ptr + q_offsets, mask=mask, other=0.0).to(tl.float32)
            q2 = tl.load(q_ptr + q_offsets + HALF_DIM, mask=mask, other=0.0).to(tl.float32)
            # Rounded to q's dtype, as the reference's rotation is.
            out1 = (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty)
            out2 = (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty)
            out_offsets = token * stride_q_out_token + heads[:, None] * stride_q_out_head + dims[None, :]
            tl.store(q_out_ptr + out_offsets, out1, mask=mask)
            tl.store(q_out_ptr + out_offsets + HALF_DIM, out2, mask=mask)

        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:  # padding tokens leave the cache alone
            block = slot // PAGE_SIZE
            offset = slot % PAGE_SIZE
            k_cache_row = k_cache_ptr + block * stride_k_cache_block + offset * stride_k_cache_offset
            v_cache_row = v_cache_ptr + block * stride_v_cache_block + offset * stride_v_cache_offset
            kv_heads = tl.arange(0, BLOCK_KV_HEADS)
            for head_start in range(0, NUM_KV_HEADS, BLOCK_KV_HEADS):
                heads = head_start + kv_heads
                mask = (heads < NUM_KV_HEADS)[:, None] & dim_valid[None, :]
                k_offsets = token * stride_k_token + heads[:, None] * stride_k_head + dims[None, :]
                k1 = tl.load(k_ptr + k_offsets, mask=mask, other=0.0).to(tl.float32)
                k2 = tl.load(k_ptr + k_offsets + HALF_DIM, mask=mask, other=0.0).to(tl.float32)
                # Rounded to k's dtype first, then to the cache's, as rotation + store_kv do.
                cache_ty = k_cache_ptr.dtype.element_ty
                out1 = quantize_kv((k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty), k_inv_scale, cache_ty,
                                   EMULATE_FP8_ROUNDING)
                out2 = quantize_kv((k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty), k_inv_scale, cache_ty,
                                   EMULATE_FP8_ROUNDING)
                k_cache_offsets = heads[:, None] * stride_k_cache_head + dims[None, :]
                tl.store(k_cache_row + k_cache_offsets, out1, mask=mask)
                tl.store(k_cache_row + k_cache_offsets + HALF_DIM, out2, mask=mask)

                v_offsets = token * stride_v_token + heads[:, None] * stride_v_head + dims[None, :]
                v1 = tl.load(v_ptr + v_offsets, mask=mask, other=0.0)
                v2 = tl.load(v_ptr + v_offsets + HALF_DIM, mask=mask, other=0.0)
                v_cache_offsets = heads[:, None] * stride_v_cache_head + dims[None, :]
                v_ty = v_cache_ptr.dtype.element_ty
                tl.store(v_cache_row + v_cache_offsets, quantize_kv(v1, v_inv_scale, v_ty, EMULATE_FP8_ROUNDING), mask=mask)
                tl.store(v_cache_row + v_cache_offsets + HALF_DIM, quantize_kv(v2, v_inv_scale, v_ty, EMULATE_FP8_ROUNDING),
                         mask=mask)

    return rope_store_kv_kernel


def kernel_constexprs(num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int) -> dict:
    """The compile-time parameters of the kernel: tiles of at most MAX_TILE_ELEMENTS per tensor."""
    half_p2 = 1 << (head_dim // 2 - 1).bit_length()
    max_heads = max(1, MAX_TILE_ELEMENTS // half_p2)
    return dict(
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF_DIM=head_dim // 2,
        HALF_DIM_P2=half_p2,
        BLOCK_Q_HEADS=min(1 << (num_q_heads - 1).bit_length(), max_heads),
        BLOCK_KV_HEADS=min(1 << (num_kv_heads - 1).bit_length(), max_heads),
        PAGE_SIZE=page_size,
    )


def rope_store_kv_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    out: Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> Tensor:
    """Same contract as rope_store_kv_ref; one program per token, no host synchronisation.

    q, k, v may be strided views (heads of one fused qkv projection); every tensor needs unit
    stride along head_dim.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} is odd")
    if k.shape != v.shape or k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if cos.shape[-1] * 2 != head_dim or sin.shape != cos.shape:
        raise ValueError(f"cos/sin of shape {tuple(cos.shape)} do not fit head_dim {head_dim}")
    if k_cache.shape[2:] != (num_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches of shape {tuple(k_cache.shape)} do not fit k {tuple(k.shape)}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    tensors = {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "k_cache": k_cache, "v_cache": v_cache, "out": out}
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along its last dim")
    if num_tokens == 0:
        return out
    from tetriinfer.kernels import store_kv_triton

    check_kv_scales(k_cache.dtype, k_scale, v_scale)
    triton_kernel()[(num_tokens,)](
        q,
        k,
        v,
        positions,
        cos,
        sin,
        k_cache,
        v_cache,
        slot_mapping,
        out,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos.stride(0),
        sin.stride(0),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        1.0 / k_scale,
        1.0 / v_scale,
        **kernel_constexprs(num_q_heads, num_kv_heads, head_dim, k_cache.shape[1]),
        EMULATE_FP8_ROUNDING=store_kv_triton.INTERPRETED and k_cache.dtype == torch.float8_e4m3fn,
        num_warps=4,
        # torch rounds each product of x1*cos - x2*sin separately; an FMA would not, so float32
        # results would differ from the reference in the last bit.
        enable_fp_fusion=False,
    )
    return out
