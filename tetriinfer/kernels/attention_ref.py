"""Paged attention in plain torch: the reference every other backend is tested against.

Runs on any device. It loops over the sequences of the batch in Python, gathers each sequence's
keys/values from its pages and does one dense causal attention per sequence, in float32.
The cache may be FP8 (e4m3, kv_cache_dtype='fp8') with one scale per tensor, `k_scale` and `v_scale`
(default 1.0): a value x is stored as e4m3(clamp(x * (1 / scale), -448, 448)) (float32 product with the
reciprocal rounded to float32, as torch divides by a scalar on the GPU; round to nearest even;
saturated, since a plain cast would turn values past +-448 into NaN) and read back as
float32(stored) * scale. The scales belong to FP8 caches only: with any other cache dtype they must
be 1.0. The Triton kernels (store_kv_triton, attention_triton) follow the same semantics.
"""

from __future__ import annotations

import torch
from torch import Tensor


FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def check_kv_scales(cache_dtype: torch.dtype, k_scale: float, v_scale: float) -> None:
    """Scales other than 1.0 need an FP8 cache (a host-side check on Python floats: no sync)."""
    if cache_dtype != FP8 and (k_scale != 1.0 or v_scale != 1.0):
        raise ValueError(f"k_scale={k_scale}, v_scale={v_scale}: KV scales apply to an FP8 cache only, "
                         f"this one is {cache_dtype}")


def store_kv(
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write new keys/values into the paged cache.

    k, v: [num_tokens, num_kv_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size,
    num_kv_heads, head_dim]; slot_mapping: [num_tokens] int64, slot = block_id * block_size + offset;
    slot < 0 (padding tokens) is skipped. k_scale, v_scale: the FP8 cache's per-tensor scales
    (see the module doc).
    """
    check_kv_scales(k_cache.dtype, k_scale, v_scale)
    block_size = k_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    # Index by (block, offset) instead of flattening, so a non-contiguous cache view works too.
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = to_cache_dtype(k[valid], k_cache.dtype, k_scale)
    v_cache[blocks, offsets] = to_cache_dtype(v[valid], v_cache.dtype, v_scale)


def to_cache_dtype(x: Tensor, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    """x (real values) in the cache's type. An FP8 cache stores x * (1 / scale) saturated at +-448: a
    plain cast would turn values past the e4m3 range into NaN. Other dtypes are a plain cast (scale 1.0)."""
    if dtype == FP8:
        y = x.float()
        if scale != 1.0:
            y = y * (1.0 / scale)  # a Python float: torch rounds it to float32, as the Triton kernel does
        return y.clamp(-FP8_MAX, FP8_MAX).to(dtype)
    check_kv_scales(dtype, scale, 1.0)
    return x.to(dtype)


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
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> Tensor:
    """Causal attention of a mixed batch (prefill chunk pieces and decodes) over the paged KV cache.

    q: [num_tokens, num_heads, head_dim]; sequence s owns q[query_start_loc[s]:query_start_loc[s+1]],
    tokens after query_start_loc[-1] are padding and get a zero output. k_cache, v_cache:
    [num_blocks, block_size, num_kv_heads, head_dim] already hold the new tokens' K/V.
    block_tables: [num_seqs, max_blocks_per_seq]; seq_lens: [num_seqs] context length after this step.
    The q_len new tokens of a sequence sit at positions seq_len - q_len .. seq_len - 1 and the token at
    position p attends to keys 0..p. Query head h reads KV head h // (num_heads // num_kv_heads).
    Returns [num_tokens, num_heads, head_dim] in q's dtype (into `out` if given). k_scale, v_scale:
    the FP8 cache's per-tensor scales; keys/values are read as float32(cache) * scale.
    """
    check_kv_scales(k_cache.dtype, k_scale, v_scale)
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)

    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    out[starts[-1] :].zero_()
    for seq, seq_len in enumerate(lens):
        start, end = starts[seq], starts[seq + 1]
        q_len = end - start
        if q_len == 0:
            continue
        num_pages = -(-seq_len // block_size)
        pages = block_tables[seq, :num_pages].long()
        # [seq_len, num_kv_heads, head_dim]: this sequence's keys/values in position order.
        k = k_cache[pages].flatten(0, 1)[:seq_len].float()
        v = v_cache[pages].flatten(0, 1)[:seq_len].float()
        if k_scale != 1.0:
            k = k * k_scale
        if v_scale != 1.0:
            v = v * v_scale
        # View query heads as (kv head, head within the group) so KV heads are broadcast, never copied.
        qs = q[start:end].float().view(q_len, num_kv_heads, group, head_dim)
        scores = torch.einsum("tkgd,skd->kgts", qs, k) * scale

        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        seq_out = torch.einsum("kgts,skd->tkgd", probs, v)
        out[start:end] = seq_out.reshape(q_len, num_heads, head_dim).to(out.dtype)
    return out
