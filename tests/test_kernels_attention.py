"""Paged attention: the torch reference against naive dense attention, the Triton kernel against the reference.

Every batch is built the way the engine builds one: each sequence's pages are taken from a shuffled
free list, its K/V are written with store_kv, and the rest of the cache (unused blocks, the tail of
each last page, block-table entries past a sequence's end) holds NaN, so a kernel that reads outside
its sequence poisons its output instead of passing by luck.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from sm90_utils import run_sm90_builds, spill_stores
from tetriinfer.kernels import attention_ref, get_kernels

# Batches are built on the CPU (seeded generator) and moved here: the GPU where there is one, else the
# CPU, where the Triton kernel runs under TRITON_INTERPRET=1.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (tokens already cached, new query tokens) per sequence.
DECODE_ONLY = [(5, 1), (16, 1), (40, 1), (0, 1)]
PREFILL_ONLY = [(0, 17), (0, 33), (0, 3)]
CHUNK_CONTINUATION = [(32, 17), (20, 16), (7, 3)]
MIXED = [(0, 33), (47, 1), (3, 1), (16, 17), (0, 1), (5, 3)]
# Many sequences (deep search for a program's sequence), one with no new tokens this step.
MANY = [((7 * i) % 50, 9 if i % 5 == 0 else 1) for i in range(37)] + [(10, 0)]
BATCHES = {
    "decode": DECODE_ONLY,
    "prefill": PREFILL_ONLY,
    "continuation": CHUNK_CONTINUATION,
    "mixed": MIXED,
    "many": MANY,
}


@dataclass
class PagedBatch:
    q: Tensor
    k_cache: Tensor
    v_cache: Tensor
    block_tables: Tensor
    query_start_loc: Tensor
    seq_lens: Tensor
    keys: list[Tensor]  # per sequence, [seq_len, num_kv_heads, head_dim], positions in order
    values: list[Tensor]
    scale: float
    k_scale: float = 1.0  # an FP8 cache's per-tensor scales (tests/test_fp8_kv_triton.py)
    v_scale: float = 1.0

    def attention_args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.query_start_loc, self.seq_lens, self.scale)

    def kv_scales(self) -> dict:
        """The scale keywords of paged_attention: none for the default 1.0 (16/32-bit caches)."""
        if (self.k_scale, self.v_scale) == (1.0, 1.0):
            return {}
        return dict(k_scale=self.k_scale, v_scale=self.v_scale)


def make_batch(
    seqs: list[tuple[int, int]],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    num_padding: int = 0,
    seed: int = 0,
    kv_dtype: torch.dtype | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> PagedBatch:
    """kv_dtype: the cache's (default: dtype); with torch.float8_e4m3fn, K/V are stored quantized with
    k_scale, v_scale, and keys/values keep the unquantized inputs."""
    kv_dtype = kv_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [cached + new for cached, new in seqs]
    pages_per_seq = [-(-n // block_size) for n in seq_lens]
    num_spare = 2
    num_blocks = sum(pages_per_seq) + num_spare
    free_blocks = torch.randperm(num_blocks, generator=gen).tolist()
    spare = free_blocks[-num_spare:]

    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=kv_dtype)
    v_cache = torch.full(cache_shape, float("nan"), dtype=kv_dtype)
    max_pages = max(pages_per_seq) + 1
    # Entries past a sequence's last page are arbitrary: point them at NaN-filled spare blocks.
    block_tables = torch.tensor(spare[:1] * (len(seqs) * max_pages), dtype=torch.int32).view(len(seqs), max_pages)

    keys, values, q_lens = [], [], []
    for seq, (cached, new) in enumerate(seqs):
        n = cached + new
        pages = [free_blocks.pop(0) for _ in range(pages_per_seq[seq])]
        block_tables[seq, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        slots = torch.tensor([pages[p // block_size] * block_size + p % block_size for p in range(n)])
        attention_ref.store_kv(k, v, k_cache, v_cache, slots, k_scale, v_scale)
        keys.append(k)
        values.append(v)
        q_lens.append(new)

    num_tokens = sum(q_lens) + num_padding
    q = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return PagedBatch(
        q=q.to(DEVICE),
        k_cache=k_cache.to(DEVICE),
        v_cache=v_cache.to(DEVICE),
        block_tables=block_tables.to(DEVICE),
        query_start_loc=query_start_loc.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        keys=[k.to(DEVICE) for k in keys],
        values=[v.to(DEVICE) for v in values],
        scale=head_dim**-0.5,
        k_scale=k_scale,
        v_scale=v_scale,
    )


def dense_causal_attention(batch: PagedBatch) -> Tensor:
    """Token by token, over each sequence's contiguous K/V with KV heads expanded: slow and obvious."""
    num_tokens, num_heads, head_dim = batch.q.shape
    out = torch.zeros(num_tokens, num_heads, head_dim, device=batch.q.device)
    starts = batch.query_start_loc.tolist()
    for seq, (k, v) in enumerate(zip(batch.keys, batch.values)):
        group = num_heads // k.shape[1]
        k = k.float().repeat_interleave(group, dim=1)
        v = v.float().repeat_interleave(group, dim=1)
        q_len = starts[seq + 1] - starts[seq]
        for t in range(q_len):
            pos = k.shape[0] - q_len + t
            scores = torch.einsum("hd,khd->hk", batch.q[starts[seq] + t].float(), k[: pos + 1]) * batch.scale
            out[starts[seq] + t] = torch.einsum("hk,khd->hd", torch.softmax(scores, dim=-1), v[: pos + 1])
    return out


# ---------------------------------------------------------------- store_kv


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_store_kv_writes_slots_and_skips_padding(backend):
    store_kv = get_kernels(backend).store_kv
    num_blocks, block_size, num_kv_heads, head_dim = 4, 8, 2, 16
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), -7.0, device=DEVICE)
    v_cache = torch.full_like(k_cache, -7.0)
    slot_mapping = torch.tensor([19, -1, 0, 31, -1, 8], dtype=torch.int64, device=DEVICE)
    k = torch.randn(len(slot_mapping), num_kv_heads, head_dim, device=DEVICE)
    v = torch.randn(len(slot_mapping), num_kv_heads, head_dim, device=DEVICE)

    store_kv(k, v, k_cache, v_cache, slot_mapping)

    expected_k = torch.full_like(k_cache, -7.0).view(-1, num_kv_heads, head_dim)
    expected_v = expected_k.clone()
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            expected_k[slot] = k[token]
            expected_v[slot] = v[token]
    torch.testing.assert_close(k_cache.view(-1, num_kv_heads, head_dim), expected_k, rtol=0, atol=0)
    torch.testing.assert_close(v_cache.view(-1, num_kv_heads, head_dim), expected_v, rtol=0, atol=0)


# ---------------------------------------------------------------- torch reference vs dense


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("batch_name", sorted(BATCHES))
def test_reference_matches_dense_attention(batch_name, group):
    batch = make_batch(BATCHES[batch_name], num_kv_heads=2, group=group, head_dim=16, num_padding=3, seed=group)
    out = attention_ref.paged_attention(*batch.attention_args())
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    torch.testing.assert_close(out, dense_causal_attention(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [3, 6, 8])
def test_reference_uneven_and_large_groups(group):
    batch = make_batch(MIXED, num_kv_heads=2, group=group, head_dim=8, num_padding=2)
    out = attention_ref.paged_attention(*batch.attention_args())
    torch.testing.assert_close(out, dense_causal_attention(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [4, 32])
def test_reference_other_block_sizes(block_size):
    batch = make_batch(MIXED, num_kv_heads=1, group=4, head_dim=8, block_size=block_size, num_padding=2)
    out = attention_ref.paged_attention(*batch.attention_args())
    torch.testing.assert_close(out, dense_causal_attention(batch), rtol=1e-5, atol=1e-5)


def test_reference_low_precision_and_out_argument():
    batch = make_batch(MIXED, num_kv_heads=2, group=2, head_dim=16, dtype=torch.bfloat16, num_padding=4)
    out = torch.full_like(batch.q, float("nan"))
    returned = attention_ref.paged_attention(*batch.attention_args(), out=out)
    assert returned is out and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense_causal_attention(batch), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_query_view(backend):
    """q as the engine gets it: a slice of a fused qkv projection, not contiguous over tokens."""
    batch = make_batch(MIXED, num_kv_heads=2, group=2, head_dim=16, num_padding=2)
    num_tokens, num_heads, head_dim = batch.q.shape
    qkv = torch.randn(num_tokens, num_heads + 4, head_dim, device=DEVICE)
    qkv[:, :num_heads] = batch.q
    batch.q = qkv[:, :num_heads]
    out = get_kernels(backend).paged_attention(*batch.attention_args())
    torch.testing.assert_close(out, dense_causal_attention(batch), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- Triton kernel vs reference


def triton_vs_reference(batch: PagedBatch, rtol: float, atol: float, **split_options) -> None:
    from tetriinfer.kernels import attention_triton

    expected = attention_ref.paged_attention(*batch.attention_args(), **batch.kv_scales())
    # A NaN-filled `out` shows any row the kernel forgets to write (padding rows included).
    out = torch.full_like(batch.q, float("nan"))
    returned = attention_triton.paged_attention(*batch.attention_args(), out=out, **split_options,
                                                **batch.kv_scales())
    assert returned is out
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("batch_name", sorted(BATCHES))
def test_triton_matches_reference_float32(batch_name, group):
    batch = make_batch(BATCHES[batch_name], num_kv_heads=2, group=group, head_dim=32, num_padding=3, seed=group)
    triton_vs_reference(batch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [3, 6, 8])
@pytest.mark.parametrize("batch_name", ["decode", "mixed"])
def test_triton_uneven_and_large_groups(batch_name, group):
    """Groups that are not a power of two leave masked head rows in every tile."""
    batch = make_batch(BATCHES[batch_name], num_kv_heads=2, group=group, head_dim=32, num_padding=2)
    triton_vs_reference(batch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_triton_head_dims(head_dim):
    batch = make_batch(MIXED, num_kv_heads=1, group=2, head_dim=head_dim, num_padding=1)
    triton_vs_reference(batch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [8, 64])
def test_triton_other_block_sizes(block_size):
    batch = make_batch(MIXED, num_kv_heads=2, group=4, head_dim=32, block_size=block_size, num_padding=2)
    triton_vs_reference(batch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch_name", ["decode", "mixed"])
def test_triton_low_precision(batch_name, dtype):
    batch = make_batch(BATCHES[batch_name], num_kv_heads=2, group=4, head_dim=64, dtype=dtype, num_padding=3)
    triton_vs_reference(batch, rtol=2e-2, atol=2e-2)


def test_triton_default_out_and_all_padding_batch():
    from tetriinfer.kernels import attention_triton

    batch = make_batch(DECODE_ONLY, num_kv_heads=2, group=2, head_dim=32, num_padding=20)
    out = attention_triton.paged_attention(*batch.attention_args())
    torch.testing.assert_close(out, attention_ref.paged_attention(*batch.attention_args()), rtol=1e-5, atol=1e-5)
    assert out[len(DECODE_ONLY) :].abs().max() == 0


# ---------------------------------------------------------------- split-KV (flash-decoding)

# Decodes over long-ish contexts; with 16-key steps most splits end mid-page and the last ones of
# the short sequences are empty.
LONG_DECODE = [(299, 1), (20, 1), (0, 1), (130, 1), (64, 1)]
# A decode batch as the engine replays it in a CUDA graph: padding sequences with no query tokens and
# no context, and padding tokens after the last real one.
GRAPH_DECODE = LONG_DECODE + [(0, 0), (0, 0)]


@pytest.mark.parametrize(
    "num_kv_splits, group, head_dim", [(1, 4, 32), (2, 4, 32), (3, 1, 32), (5, 3, 32), (8, 4, 32), (4, 2, 80)]
)
def test_triton_split_kv_matches_reference(num_kv_splits, group, head_dim):
    batch = make_batch(LONG_DECODE, num_kv_heads=2, group=group, head_dim=head_dim, num_padding=3, seed=num_kv_splits)
    triton_vs_reference(batch, rtol=1e-5, atol=1e-5, num_kv_splits=num_kv_splits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_split_kv_low_precision(dtype):
    batch = make_batch(GRAPH_DECODE, num_kv_heads=2, group=4, head_dim=64, dtype=dtype, num_padding=2)
    triton_vs_reference(batch, rtol=2e-2, atol=2e-2, num_kv_splits=4)


def test_triton_split_kv_prefill_and_padding_sequences():
    """Forced splits work for any batch: causal prefill tiles, and sequences with no query tokens."""
    batch = make_batch(MIXED + [(0, 0)], num_kv_heads=2, group=2, head_dim=32, num_padding=2)
    triton_vs_reference(batch, rtol=1e-5, atol=1e-5, num_kv_splits=3)


@pytest.mark.parametrize("max_seq_len", [None, 1, 4096])
def test_triton_split_count_bound_never_changes_the_result(max_seq_len):
    """The bound only picks the split count (default: what the block table addresses, 2 splits here);
    a bound below or far above the real lengths still gives the right answer."""
    batch = make_batch(GRAPH_DECODE, num_kv_heads=2, group=4, head_dim=32, num_padding=2)
    triton_vs_reference(batch, rtol=1e-5, atol=1e-5, max_seq_len=max_seq_len)


def test_split_count_fills_the_gpu_only_where_it_pays():
    from tetriinfer.kernels.attention_launch import (
        MAX_KV_SPLITS,
        MIN_SPLIT_TOKENS,
        PROGRAMS_PER_SM,
        choose_num_kv_splits,
    )

    # Llama-3-8B (8 KV heads) on 132 SMs: batch 1 at 8k splits as far as allowed, at 1k only into
    # MIN_SPLIT_TOKENS pieces.
    assert choose_num_kv_splits(num_tiles=1, num_kv_heads=8, max_seq_len=8192, num_sms=132) == MAX_KV_SPLITS
    assert choose_num_kv_splits(num_tiles=1, num_kv_heads=8, max_seq_len=1024, num_sms=132) == 1024 // MIN_SPLIT_TOKENS
    # Batch 32 at 8k: just enough programs for every SM, more of them on a bigger GPU.
    for sms in (132, 170):
        splits = choose_num_kv_splits(num_tiles=32, num_kv_heads=8, max_seq_len=8192, num_sms=sms)
        assert 32 * 8 * splits >= PROGRAMS_PER_SM * sms > 32 * 8 * (splits - 1)
    # Big batches fill the GPU already; short contexts do not pay for a split.
    assert choose_num_kv_splits(num_tiles=256, num_kv_heads=8, max_seq_len=8192, num_sms=132) == 1
    assert choose_num_kv_splits(num_tiles=1, num_kv_heads=8, max_seq_len=MIN_SPLIT_TOKENS, num_sms=132) == 1
    assert choose_num_kv_splits(num_tiles=1, num_kv_heads=8, max_seq_len=0, num_sms=132) == 1


def test_triton_rejects_zero_splits():
    from tetriinfer.kernels import attention_triton

    batch = make_batch(DECODE_ONLY, num_kv_heads=1, group=1, head_dim=16)
    with pytest.raises(ValueError, match="num_kv_splits must be >= 1"):
        attention_triton.paged_attention(*batch.attention_args(), num_kv_splits=0)


# ---------------------------------------------------------------- the kernel as a real GPU would build it

# Runs without TRITON_INTERPRET (it must be unset before triton is imported), compiles the kernels to
# sm_90 cubins with the ptxas that ships in the triton wheel (no GPU needed) and prints ptxas's
# registers and spills per configuration. The interpreter accepts code that does not lower; this does not.
SM90_COMPILE = """
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tetriinfer.kernels import attention_triton as at
from tetriinfer.kernels.attention_launch import choose_tiles

def compile_sm90(kernel, constexprs, pointer_types, num_warps, num_stages=3):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        else:
            signature[name] = "fp32" if name in ("scale_log2", "v_scale") else "i32"
    # What a GPU launch specialises on: 16-byte aligned tensors, strides that are multiples of 16
    # (head_dim is) except block-table rows. Without it loads are not vectorised and use 2x registers.
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(kernel.arg_names)
        if name in pointer_types or (name.startswith("stride_") and name != "stride_block_table")
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    assert compiled.asm["cubin"], "no cubin"

ELEM = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "float8_e4m3fn": "*fp8e4nv"}
for dtype_name, head_dim, group, decode_heavy, splits, *kv_dtype_name in json.loads(sys.argv[1]):
    # An optional sixth entry is the cache's dtype (an FP8 cache); by default q's.
    kv_dtype_name = kv_dtype_name[0] if kv_dtype_name else dtype_name
    dtype, kv_dtype = getattr(torch, dtype_name), getattr(torch, kv_dtype_name)
    elem, kv_elem = ELEM[dtype_name], ELEM[kv_dtype_name]
    tiles = choose_tiles(decode_heavy, head_dim, group, dtype)
    pointers = dict(q_ptr=elem, k_cache_ptr=kv_elem, v_cache_ptr=kv_elem, out_ptr=elem if splits == 1 else "*fp32",
                    lse_ptr="*fp32", block_tables_ptr="*i32", query_start_loc_ptr="*i32", seq_lens_ptr="*i32")
    constexprs = at.kernel_constexprs(group, head_dim, 16, tiles, dtype, splits, kv_dtype)
    compile_sm90(at._paged_attention_kernel, constexprs, pointers, tiles.num_warps, tiles.num_stages)
    print("CONFIG attention", dtype_name, kv_dtype_name, head_dim, group, decode_heavy, splits, tiles, flush=True)
    if splits > 1 and kv_dtype == dtype:  # the merge reads float32 partials, whatever the cache holds
        pointers = dict(partial_ptr="*fp32", lse_ptr="*fp32", out_ptr=elem)
        compile_sm90(at._merge_kv_splits_kernel, at.merge_constexprs(head_dim, splits), pointers, at.MERGE_NUM_WARPS)
        print("CONFIG merge", dtype_name, head_dim, splits, flush=True)
"""

# (dtype, head_dim, GQA group, decode_heavy, KV splits): each branch of choose_tiles, split and not.
SM90_CONFIGS = [
    ("bfloat16", 128, 4, True, 1),  # Llama-3-8B decode, big batch
    ("bfloat16", 128, 4, True, 32),  # Llama-3-8B decode, small batch: MAX_KV_SPLITS
    ("float16", 80, 8, True, 8),
    ("bfloat16", 256, 2, True, 4),
    ("float32", 128, 4, True, 1),
    ("float32", 256, 1, True, 4),
    ("bfloat16", 128, 1, False, 1),
    ("float16", 80, 8, False, 1),
    ("float32", 128, 1, False, 1),
    ("bfloat16", 256, 2, False, 1),
    ("float32", 256, 1, False, 1),
    # FP8 caches (kv_cache_dtype='fp8'): the same tiles, e4m3 K/V widened to q's dtype.
    ("bfloat16", 128, 4, True, 1, "float8_e4m3fn"),
    ("bfloat16", 128, 4, True, 32, "float8_e4m3fn"),
    ("float16", 80, 8, True, 8, "float8_e4m3fn"),
    ("bfloat16", 128, 1, False, 1, "float8_e4m3fn"),
    ("bfloat16", 256, 2, False, 1, "float8_e4m3fn"),
    ("float32", 128, 4, True, 1, "float8_e4m3fn"),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="compile-only check for machines without a GPU; "
                    "on a GPU the kernel itself runs in the tests above")
def test_triton_kernel_compiles_for_sm90_without_spills(tmp_path):
    stdout = run_sm90_builds(SM90_COMPILE, SM90_CONFIGS, tmp_path, TRITON_DEFAULT_FP_FUSION="1")
    num_compiles = len(SM90_CONFIGS) + sum(1 for config in SM90_CONFIGS if config[4] > 1 and len(config) == 5)
    assert stdout.count("CONFIG") == num_compiles
    spills = spill_stores(stdout)
    assert len(spills) == num_compiles, stdout[-3000:]
    assert spills == [0] * num_compiles, f"register spills on sm_90: {stdout[-3000:]}"


# ---------------------------------------------------------------- backend selection


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_kernels("flash")


def test_missing_triton_is_a_clear_error(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "triton" else real_find_spec(name))
    with pytest.raises(ImportError, match="needs the triton package"):
        get_kernels("triton")


def test_backends_expose_both_functions():
    for name in ("torch", "triton"):
        backend = get_kernels(name)
        assert backend.name == name and callable(backend.store_kv) and callable(backend.paged_attention)


def test_importing_kernels_does_not_import_triton():
    code = "import sys, tetriinfer.kernels; assert 'triton' not in sys.modules, 'triton was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
