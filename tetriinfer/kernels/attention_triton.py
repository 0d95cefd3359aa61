"""Paged attention as Triton kernels over a mixed batch (prefill chunk pieces and decodes).

Grid: (query tile, KV head, KV split). A program takes up to BLOCK_Q query tokens of one sequence
times all query heads of one KV group, packed as BLOCK_M = BLOCK_Q * GROUP_P2 rows, so each K/V tile
is loaded once for the whole group. It walks its share of the sequence's keys BLOCK_N at a time
through the block table, up to the causal limit of its last token, with an online softmax in float32.

Tiles are found without a host sync (so the launch can be captured in a CUDA graph): sequence s
owns the programs from `query_start_loc[s] // BLOCK_Q + s` on, which leaves room for its
ceil(q_len / BLOCK_Q) tiles; a program finds its sequence by binary search over those starts, and
programs past a sequence's last tile do nothing. One extra pseudo-sequence after the last covers the
padding tokens, whose output is written as zeros.

Split-KV (flash-decoding): a decode batch has one tile per (sequence, KV head), far too few programs
to fill the GPU at small batch sizes (batch 1 of Llama-3-8B: 8 programs on 132 SMs). There each
tile's keys are cut into num_splits nearly equal ranges (BLOCK_N-aligned, sized per sequence inside
the kernel), one program each; every program writes its normalised partial output and its
log-sum-exp to a float32 workspace, and _merge_kv_splits_kernel combines them. The split count
depends only on host-known values (batch shape, an upper bound of the context length), never on
device data, and any split count gives the same attention (up to float rounding); the bound only
decides how many splits pay.

FP8 cache (torch.float8_e4m3fn = tl.float8e4nv, per-tensor k_scale and v_scale; semantics in
attention_ref): K/V tiles are loaded as e4m3 (half the bytes of a 16-bit cache) and widened to the
query's dtype for tl.dot, which is exact (every e4m3 value is a bfloat16/float16 value). The scales
never touch the tiles: k_scale is folded into the softmax scale on the host (q . (k * k_scale) =
(q . k) * k_scale) and v_scale multiplies each row's normalised output once (softmax weights are
linear in v), before the split-KV workspace, so the merge needs nothing. Same result as the
reference's float32(cache) * scale up to float32 rounding (float32 queries use TF32 dots over an
FP8 cache: see kernel_constexprs), and 16/32-bit caches run the code they always did (KV_FP8 is a
constexpr).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from tetriinfer.kernels.attention_launch import TileConfig, choose_num_kv_splits, choose_tiles, num_sms
from tetriinfer.kernels.attention_ref import FP8, check_kv_scales, store_kv

__all__ = ["store_kv", "paged_attention"]

LOG2_E = 1.4426950408889634
FP16_MAX = tl.constexpr(65504.0)  # the largest finite float16
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

MERGE_NUM_WARPS = 4  # the merge reads at most attention_launch.MAX_KV_SPLITS x head_dim floats per (token, head)


# Batch sizes and the block table's width change every eager step: compiling one kernel per
# divisibility class of them (Triton's default integer specialisation) would stall the first step of
# every new class for half a second or more.
@triton.jit(do_not_specialize=["num_seqs", "num_tokens", "stride_block_table", "stride_out_split"])
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,  # the output, or with SPLIT_KV the float32 partial outputs [tokens, heads, splits, dim]
    lse_ptr,  # with SPLIT_KV: float32 [tokens, heads, splits] log2-sum-exp2 of each split's scores
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    scale_log2,  # softmax scale times log2(e) (times k_scale with an FP8 cache): the kernel uses exp2
    num_seqs,
    num_tokens,
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_out_split,
    stride_k_block,
    stride_k_offset,
    stride_k_head,
    stride_v_block,
    stride_v_offset,
    stride_v_head,
    stride_block_table,
    v_scale,  # with KV_FP8: the V cache's per-tensor scale
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P2: tl.constexpr,  # GROUP rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    PAGE_SIZE: tl.constexpr,  # tokens per KV cache block
    BLOCK_M: tl.constexpr,  # rows per program: BLOCK_Q tokens x GROUP_P2 heads
    BLOCK_N: tl.constexpr,  # keys per step of the KV walk
    SPLIT_KV: tl.constexpr,  # several programs share a tile's keys (the grid's third axis)
    DOT_DTYPE: tl.constexpr,  # operand type of tl.dot: the query dtype, except under the interpreter
    DOT_PRECISION: tl.constexpr,  # "ieee" keeps float32 exact (no TF32), except over an FP8 cache; 16-bit inputs ignore it
    KV_FP8: tl.constexpr,  # the cache is e4m3: values times v_scale (k_scale is in scale_log2)
    CLAMP_Q: tl.constexpr = False,  # bfloat16 queries meet an FP8 cache in a float16 dot (kernel_constexprs)
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_P2
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)  # not a constexpr: every split count runs one compiled kernel

    # Largest seq in [0, num_seqs] whose first tile is <= tile_id; seq == num_seqs is the padding.
    lo = tl.zeros([], dtype=tl.int32)
    hi = num_seqs + tl.zeros([], dtype=tl.int32)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        mid_first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(mid_first_tile <= tile_id, mid, lo)
        hi = tl.where(mid_first_tile <= tile_id, hi, mid - 1)
    seq = lo
    is_real_seq = seq < num_seqs

    q_start = tl.load(query_start_loc_ptr + seq)
    q_end = tl.load(query_start_loc_ptr + seq + 1, mask=is_real_seq, other=num_tokens)
    q_len = q_end - q_start
    # The padding pseudo-sequence has no keys: its rows keep l == 0 and are stored as zeros.
    seq_len = tl.load(seq_lens_ptr + seq, mask=is_real_seq, other=0)
    tile_in_seq = tile_id - (q_start // BLOCK_Q + seq)

    rows = tl.arange(0, BLOCK_M)
    token_in_seq = tile_in_seq * BLOCK_Q + rows // GROUP_P2
    head_in_group = rows % GROUP_P2
    row_valid = (token_in_seq < q_len) & (head_in_group < GROUP)
    q_token = q_start + token_in_seq
    q_head = kv_head * GROUP + head_in_group
    q_pos = seq_len - q_len + token_in_seq

    dims = tl.arange(0, HEAD_DIM_P2)
    dim_valid = dims < HEAD_DIM
    q_offsets = q_token[:, None] * stride_q_token + q_head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    if CLAMP_Q:  # a bfloat16 query past float16's range would become inf in the float16 dot
        q = tl.minimum(tl.maximum(q.to(tl.float32), -FP16_MAX), FP16_MAX)
    q = q.to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite, so fully masked rows never give NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], dtype=tl.float32)

    # Keys 0 .. kv_limit - 1 are visible to some row of this tile (the causal limit of its last token).
    tile_has_rows = tile_in_seq * BLOCK_Q < q_len
    kv_limit = tl.minimum(seq_len, seq_len - q_len + (tile_in_seq + 1) * BLOCK_Q)
    kv_limit = tl.where(tile_has_rows, tl.maximum(kv_limit, 0), 0)
    # This program's share: the split-th of num_splits BLOCK_N-aligned ranges (the last ones may be
    # short or empty).
    split_len = tl.cdiv(tl.cdiv(kv_limit, num_splits), BLOCK_N) * BLOCK_N
    kv_begin = split * split_len
    kv_end = tl.minimum(kv_begin + split_len, kv_limit)
    block_table_row = block_tables_ptr + seq * stride_block_table
    for kv_start in range(kv_begin, kv_end, BLOCK_N):
        k_pos = kv_start + tl.arange(0, BLOCK_N)
        k_valid = k_pos < kv_end
        # Per-key page lookup, so BLOCK_N need not equal the page size.
        page = tl.load(block_table_row + k_pos // PAGE_SIZE, mask=k_valid, other=0).to(tl.int64)
        page_offset = k_pos % PAGE_SIZE
        kv_mask = k_valid[:, None] & dim_valid[None, :]
        k_offsets = page[:, None] * stride_k_block + page_offset[:, None] * stride_k_offset + dims[None, :]
        v_offsets = page[:, None] * stride_v_block + page_offset[:, None] * stride_v_offset + dims[None, :]
        # other=0 matters: stale cache contents may be NaN, and 0 * NaN would leak into the sum.
        k = tl.load(k_cache_ptr + kv_head * stride_k_head + k_offsets, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        v = tl.load(v_cache_ptr + kv_head * stride_v_head + v_offsets, mask=kv_mask, other=0.0).to(DOT_DTYPE)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = row_valid[:, None] & k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if KV_FP8:
        out = out * v_scale
    row_offsets = q_token * stride_out_token + q_head * stride_out_head + split * stride_out_split
    out_offsets = row_offsets[:, None] + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])
    if SPLIT_KV:
        # A split with no keys has l == 0: lse = -inf, so the merge gives it no weight.
        num_heads = tl.num_programs(1) * GROUP
        lse_offsets = (q_token * num_heads + q_head) * num_splits + split
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + lse_offsets, lse, mask=row_valid)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_kv_splits_kernel(
    partial_ptr,  # float32 [tokens, heads, num_splits, HEAD_DIM], each split's normalised output
    lse_ptr,  # float32 [tokens, heads, num_splits], log2-sum-exp2 of each split's scores
    out_ptr,
    stride_out_token,
    stride_out_head,
    num_splits,
    NUM_SPLITS_P2: tl.constexpr,  # num_splits rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    row = token * tl.num_programs(1) + head
    splits = tl.arange(0, NUM_SPLITS_P2)
    dims = tl.arange(0, HEAD_DIM_P2)
    split_valid = splits < num_splits
    lse = tl.load(lse_ptr + row * num_splits + splits, mask=split_valid, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    # A row no split saw a key of (a padding token) has every weight 0 and comes out as zeros.
    weight = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    partial_offsets = (row * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :]
    mask = split_valid[:, None] & (dims < HEAD_DIM)[None, :]
    partial = tl.load(partial_ptr + partial_offsets, mask=mask, other=0.0)
    weight_sum = tl.sum(weight, axis=0)
    out = tl.sum(weight[:, None] * partial, axis=0) / tl.where(weight_sum > 0, weight_sum, 1.0)
    out_offsets = token * stride_out_token + head * stride_out_head + dims
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


# Under TRITON_INTERPRET=1 (CPU tests), triton.jit builds an InterpretedFunction.
INTERPRETED = isinstance(_paged_attention_kernel, InterpretedFunction)


def kernel_constexprs(
    group: int,
    head_dim: int,
    page_size: int,
    tiles: TileConfig,
    dtype: torch.dtype,
    num_kv_splits: int,
    kv_dtype: torch.dtype | None = None,
) -> dict:
    """The compile-time parameters of _paged_attention_kernel; dtype is the query's, kv_dtype the
    cache's (default: the same; torch.float8_e4m3fn for an FP8 cache, whose tiles are widened to
    dtype for tl.dot)."""
    dot_dtype = TL_DTYPES[dtype]
    # The interpreter multiplies bfloat16 as raw uint16 bits in tl.dot (triton-lang/triton#11584;
    # its docs say to compute bfloat16 in float32), so there the operands are upcast first.
    if dtype == torch.bfloat16 and INTERPRETED:
        dot_dtype = tl.float32
    # bfloat16 queries over an FP8 cache multiply in float16: e4m3 widens to float16 in one
    # instruction (to bfloat16 it goes through float32), and float16 holds every e4m3 value and
    # p in [0, 1] more exactly. 1.2x faster decode attention at batch 32 on an H100
    # (docs/benchmarks/gpu.md); the query is clamped to float16's range first.
    clamp_q = dtype == torch.bfloat16 and kv_dtype == FP8 and not INTERPRETED
    if clamp_q:
        dot_dtype = tl.float16
    # float32 queries over an FP8 cache take TF32: its 2**-11 rounding of q and p is far below e4m3's
    # 2**-4, and an "ieee" (FMA) float32 dot over widened e4m3 tiles spills hundreds of bytes on sm_90.
    return dict(
        GROUP=group,
        GROUP_P2=triton.next_power_of_2(group),
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=max(triton.next_power_of_2(head_dim), 16),
        PAGE_SIZE=page_size,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        SPLIT_KV=num_kv_splits > 1,
        DOT_DTYPE=dot_dtype,
        DOT_PRECISION="ieee" if dot_dtype == tl.float32 and kv_dtype != FP8 else "tf32",
        KV_FP8=kv_dtype == FP8,
        CLAMP_Q=clamp_q,
    )


def merge_constexprs(head_dim: int, num_kv_splits: int) -> dict:
    """The compile-time parameters of _merge_kv_splits_kernel."""
    return dict(
        NUM_SPLITS_P2=triton.next_power_of_2(num_kv_splits),
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=triton.next_power_of_2(head_dim),
    )


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    query_start_loc: Tensor,
    seq_lens: Tensor,
    scale: float,
    out: Tensor | None = None,
    *,
    max_seq_len: int | None = None,
    num_kv_splits: int | None = None,
    tiles: TileConfig | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> Tensor:
    """Same contract as tetriinfer.kernels.attention_ref.paged_attention (k_scale, v_scale: an FP8
    cache's per-tensor scales), plus tuning knobs that never change the result.

    max_seq_len: a host-known upper bound of seq_lens (default: what the block table can address,
    block_tables.shape[1] * block_size); decode-heavy batches split each sequence's keys over
    choose_num_kv_splits(...) programs. num_kv_splits: force the split count (tests, tuning), for
    any batch. tiles: force the tile shape (tuning; it must hold a whole GQA group).
    """
    num_tokens, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if page_size & (page_size - 1):
        raise ValueError(f"KV cache block size must be a power of two, got {page_size}")
    if num_kv_splits is not None and num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"K cache {k_cache.dtype} and V cache {v_cache.dtype} differ")
    check_kv_scales(k_cache.dtype, k_scale, v_scale)
    if out is None:
        out = torch.empty_like(q)
    # The kernel assumes unit stride along head_dim (true for every cache layout we allocate).
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim")
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0:
        return out

    # The interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even, so there
    # the kernels write float32 and torch rounds.
    kernel_out = out
    if q.dtype == torch.bfloat16 and INTERPRETED:
        kernel_out = torch.empty(out.shape, dtype=torch.float32, device=out.device)

    group = num_heads // num_kv_heads
    decode_heavy = num_tokens <= 2 * num_seqs
    tiles = tiles or choose_tiles(decode_heavy, head_dim, group, q.dtype)
    if num_kv_splits is None:
        if max_seq_len is None:
            max_seq_len = block_tables.shape[1] * page_size
        # Prefill and mixed batches have tiles enough; only decodes split.
        num_kv_splits = 1
        if decode_heavy:
            num_kv_splits = choose_num_kv_splits(num_seqs, num_kv_heads, max_seq_len, num_sms(q.device))
    block_q = tiles.block_m // triton.next_power_of_2(group)
    # Enough programs for every sequence's tiles plus the padding pseudo-sequence (see module doc).
    grid = (num_tokens // block_q + num_seqs + 1, num_kv_heads, num_kv_splits)
    if num_kv_splits == 1:
        partial, lse = kernel_out, None
        stride_partial = (kernel_out.stride(0), kernel_out.stride(1), 0)
    else:
        partial = torch.empty(num_tokens, num_heads, num_kv_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_tokens, num_heads, num_kv_splits, dtype=torch.float32, device=q.device)
        stride_partial = partial.stride()[:3]
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        partial,
        lse,
        block_tables,
        query_start_loc,
        seq_lens,
        scale * k_scale * LOG2_E,
        num_seqs,
        num_tokens,
        q.stride(0),
        q.stride(1),
        *stride_partial,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        v_scale,
        **kernel_constexprs(group, head_dim, page_size, tiles, q.dtype, num_kv_splits, k_cache.dtype),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    if num_kv_splits > 1:
        _merge_kv_splits_kernel[(num_tokens, num_heads)](
            partial,
            lse,
            kernel_out,
            kernel_out.stride(0),
            kernel_out.stride(1),
            num_kv_splits,
            **merge_constexprs(head_dim, num_kv_splits),
            num_warps=MERGE_NUM_WARPS,
        )
    if kernel_out is not out:
        out.copy_(kernel_out)
    return out
