"""FP8 KV cache (kv_cache_dtype='fp8', e4m3 with per-tensor k_scale / v_scale) in the Triton kernels:
store_kv_triton against attention_ref.store_kv bit for bit, attention_triton against
attention_ref.paged_attention on the batches of test_kernels_attention (NaN-poisoned caches, odd
sequence lengths, GQA groups, decode-only and mixed prefill batches, split-KV), and the kernels as
sm_90 would build them.

On the CPU the kernels run under TRITON_INTERPRET=1 (conftest.py). The interpreter's own float32 ->
float8 cast rounds wrongly, so store_kv_triton rounds to the e4m3 grid itself there
(EMULATE_FP8_ROUNDING); on a GPU these same tests run the hardware conversion.
"""

from __future__ import annotations

import pytest
import torch

from sm90_utils import assert_builds_without_spills
from test_kernels_attention import (
    BATCHES,
    DECODE_ONLY,
    DEVICE,
    GRAPH_DECODE,
    LONG_DECODE,
    MIXED,
    dense_causal_attention,
    make_batch,
    triton_vs_reference,
)
from tetriinfer.kernels import attention_ref, get_kernels

FP8 = torch.float8_e4m3fn
# (k_scale, v_scale): the fixed 1.0 of an uncalibrated checkpoint, and calibrated-looking scales that
# are not powers of two (so 1 / scale is inexact), one small enough to push values past +-448 and
# one large enough to leave small values subnormal in e4m3.
SCALES = [(1.0, 1.0), (0.0137, 3.3)]
# float32 queries over an FP8 cache use TF32 dots on a GPU (attention_triton.kernel_constexprs).
TOL = {torch.float32: 5e-3, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal FP8 tensors, where any NaN equals any NaN (e4m3 has two: 0x7F and 0xFF)."""
    both_nan = a.float().isnan() & b.float().isnan()
    return bool(((a.view(torch.uint8) == b.view(torch.uint8)) | both_nan).all())


def special_values(scale: float) -> torch.Tensor:
    """Every e4m3 value, every midpoint between neighbours (ties to even), the floats just either
    side of each midpoint, values past the range, zeros of both signs, NaN: all times `scale`, so the
    quantized value x * (1 / scale) lands on them."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[~grid.isnan()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    up, down = mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(-1e9))
    extra = torch.tensor([500.0, -500.0, 1e30, -1e30, 0.0, -0.0, float("nan"), 1e-30, -1e-30, float("inf")])
    return torch.cat([grid, mids, up, down, extra]) * scale


# ---------------------------------------------------------------- store_kv


@pytest.mark.parametrize("scale", [1.0, 0.37, 4.0, 1 / 3, 1e-3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_kv_triton_writes_an_fp8_cache_bit_for_bit_like_the_reference(dtype, scale):
    """Odd head count and head_dim (masked lanes), strided k/v (views of a fused qkv), padding
    slots that must leave the cache alone, random values over nine decades plus the special values."""
    gen = torch.Generator().manual_seed(0)
    num_kv_heads, head_dim, block_size = 3, 24, 4
    values = torch.cat([special_values(scale), torch.randn(3000, generator=gen) * torch.logspace(-6, 3, 3000)])
    values = values[torch.randperm(len(values), generator=gen)]
    per_token = num_kv_heads * head_dim
    num_tokens = len(values) // per_token
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=gen).to(dtype)
    k, v = qkv[:, :num_kv_heads], qkv[:, num_kv_heads : 2 * num_kv_heads]
    k.copy_(values[: num_tokens * per_token].view(num_tokens, num_kv_heads, head_dim).to(dtype))
    v.copy_(-k.flip(0))
    num_blocks = -(-2 * num_tokens // block_size)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::7] = -1  # padding tokens

    caches = {}
    for backend in ("torch", "triton"):
        # 0x7E = 448: what no padding slot may lose.
        k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), 448.0, dtype=FP8, device=DEVICE)
        v_cache = k_cache.clone()
        get_kernels(backend).store_kv(k.to(DEVICE), v.to(DEVICE), k_cache, v_cache, slots.to(DEVICE), scale, scale)
        caches[backend] = (k_cache.cpu(), v_cache.cpu())
    for ref, got in zip(caches["torch"], caches["triton"]):
        assert same_bits(got, ref)
    # The comparison saw real work: saturated values, NaN, and the untouched padding slots.
    k_ref = caches["torch"][0].float().flatten(0, 1)
    assert k_ref.isnan().any() and (k_ref.abs() == 448).any()
    assert (k_ref[slots[slots >= 0]].abs() < 448).any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_store_divides_by_the_scale_saturates_and_rounds_ties_to_even(backend):
    scale = 2.0
    x = torch.tensor([[[1000.0, -1000.0, 3.0, 34.0, 38.0, -0.0, 0.001, 448.0]]], device=DEVICE)
    cache = torch.zeros(1, 2, 1, 8, dtype=FP8, device=DEVICE)
    get_kernels(backend).store_kv(x, x, cache, cache.clone(), torch.tensor([1], device=DEVICE), scale, 1.0)
    stored = cache[0, 1, 0].float().cpu()
    # 500 -> 448; 17 and 19 are ties between e4m3 neighbours (16, 18, 20): to the even mantissa;
    # 0.0005 is below half the smallest subnormal (2**-9) and rounds to zero.
    assert stored.tolist() == [448.0, -448.0, 1.5, 16.0, 20.0, 0.0, 0.0, 224.0]
    assert torch.tensor(1.0).copysign(stored[5]) == -1.0  # -0.0 keeps its sign


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kv_scales_need_an_fp8_cache(backend):
    kernels = get_kernels(backend)
    batch = make_batch(DECODE_ONLY, num_kv_heads=1, group=2, head_dim=16, dtype=torch.bfloat16)
    k = torch.zeros(1, 1, 16, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="KV scales apply to an FP8 cache only"):
        kernels.store_kv(k, k, batch.k_cache, batch.v_cache, torch.tensor([0], device=DEVICE), 0.5, 1.0)
    with pytest.raises(ValueError, match="KV scales apply to an FP8 cache only"):
        kernels.paged_attention(*batch.attention_args(), v_scale=2.0)
    # 1.0 is every cache's scale.
    kernels.paged_attention(*batch.attention_args(), k_scale=1.0, v_scale=1.0)


# ---------------------------------------------------------------- paged attention


def fp8_batch(seqs, dtype=torch.float32, scales=(1.0, 1.0), **kwargs):
    k_scale, v_scale = scales
    return make_batch(seqs, dtype=dtype, kv_dtype=FP8, k_scale=k_scale, v_scale=v_scale, **kwargs)


@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("batch_name", ["decode", "mixed"])
def test_reference_reads_an_fp8_cache_as_dequantized_values(batch_name, scales):
    """The reference over an FP8 cache is dense attention over float32(e4m3(x / scale)) * scale."""
    batch = fp8_batch(BATCHES[batch_name], num_kv_heads=2, group=2, head_dim=16, num_padding=2, scales=scales)
    out = attention_ref.paged_attention(*batch.attention_args(), **batch.kv_scales())
    quantized = [attention_ref.to_cache_dtype(x, FP8, s).float() * s
                 for xs, s in ((batch.keys, batch.k_scale), (batch.values, batch.v_scale)) for x in xs]
    batch.keys, batch.values = quantized[: len(batch.keys)], quantized[len(batch.keys) :]
    torch.testing.assert_close(out, dense_causal_attention(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("batch_name", sorted(BATCHES))
def test_triton_matches_reference_over_an_fp8_cache(batch_name, group, scales):
    """Decode-only, prefill, chunk continuations, mixed and many-sequence batches; uneven GQA groups;
    sequence lengths off the page size; padding tokens; float32 queries."""
    batch = fp8_batch(BATCHES[batch_name], num_kv_heads=2, group=group, head_dim=32, num_padding=3, seed=group,
                      scales=scales)
    triton_vs_reference(batch, rtol=TOL[torch.float32], atol=TOL[torch.float32])


@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch_name", ["decode", "mixed", "continuation"])
def test_triton_fp8_cache_with_16_bit_queries(batch_name, dtype, scales):
    batch = fp8_batch(BATCHES[batch_name], dtype=dtype, num_kv_heads=2, group=4, head_dim=64, num_padding=3,
                      scales=scales)
    triton_vs_reference(batch, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("head_dim, block_size", [(80, 8), (128, 64), (24, 16)])
def test_triton_fp8_cache_head_dims_and_block_sizes(head_dim, block_size):
    batch = fp8_batch(MIXED, dtype=torch.bfloat16, num_kv_heads=1, group=2, head_dim=head_dim, block_size=block_size,
                      num_padding=1, scales=SCALES[1])
    triton_vs_reference(batch, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("num_kv_splits, group, dtype", [(2, 4, torch.float32), (5, 3, torch.float32),
                                                         (3, 2, torch.bfloat16), (8, 1, torch.float16)])
def test_triton_split_kv_over_an_fp8_cache(num_kv_splits, group, dtype):
    """The split-KV path: each split's partial output already carries v_scale, the merge combines."""
    batch = fp8_batch(LONG_DECODE, dtype=dtype, num_kv_heads=2, group=group, head_dim=32, num_padding=3,
                      seed=num_kv_splits, scales=SCALES[1])
    triton_vs_reference(batch, rtol=TOL[dtype], atol=TOL[dtype], num_kv_splits=num_kv_splits)


@pytest.mark.parametrize("scales", SCALES)
def test_triton_fp8_graph_shaped_decode_with_the_default_split_choice(scales):
    """Padding sequences with no tokens and no context, padding tokens, the split count the kernel
    picks itself (2 here)."""
    batch = fp8_batch(GRAPH_DECODE, dtype=torch.bfloat16, num_kv_heads=2, group=4, head_dim=32, num_padding=2,
                      scales=scales)
    triton_vs_reference(batch, rtol=2e-2, atol=2e-2)
    out = get_kernels("triton").paged_attention(*batch.attention_args(), **batch.kv_scales())
    assert out[len(LONG_DECODE) :].abs().max() == 0


def test_triton_store_then_attend_matches_the_reference_pipeline():
    """One engine step on each backend: write this step's K/V (a prefill chunk and decodes) into an
    FP8 cache that already holds the earlier tokens, then attend."""
    k_scale, v_scale = SCALES[1]
    seqs = [(21, 9), (40, 1), (0, 5), (17, 1)]
    batch = fp8_batch(seqs, dtype=torch.bfloat16, num_kv_heads=2, group=3, head_dim=32, scales=SCALES[1])
    block_size = batch.k_cache.shape[1]
    new_k, new_v, slots = [], [], []
    for seq, (cached, new) in enumerate(seqs):
        pages = batch.block_tables[seq].tolist()
        slots += [pages[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
        new_k.append(batch.keys[seq][cached:])
        new_v.append(batch.values[seq][cached:])
    k, v = torch.cat(new_k), torch.cat(new_v)
    slots = torch.tensor(slots + [-1, -1], device=DEVICE)  # two padding tokens
    k, v = torch.cat([k, k[:2]]), torch.cat([v, v[:2]])
    outs, caches = {}, {}
    for backend in ("torch", "triton"):
        kernels = get_kernels(backend)
        k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
        # The new tokens' slots hold stale values until this step writes them.
        k_cache.flatten(0, 1)[slots[slots >= 0]] = float("nan")
        kernels.store_kv(k, v, k_cache, v_cache, slots, k_scale, v_scale)
        caches[backend] = (k_cache, v_cache)
        args = (batch.q, k_cache, v_cache, *batch.attention_args()[3:])
        outs[backend] = kernels.paged_attention(*args, k_scale=k_scale, v_scale=v_scale)
    assert same_bits(caches["triton"][0], caches["torch"][0]) and same_bits(caches["triton"][1], caches["torch"][1])
    assert same_bits(caches["torch"][0], batch.k_cache)  # the same cache make_batch built
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- the store kernel as sm_90 builds it

SM90_STORE = """
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tetriinfer.kernels import store_kv_triton as st

ELEM = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "float8_e4m3fn": "*fp8e4nv"}
for dtype, cache_dtype, num_kv_heads, head_dim in json.loads(sys.argv[1]):
    kernel = st._store_kv_kernel
    constexprs = dict(NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEADS_P2=triton.next_power_of_2(num_kv_heads),
                      DIM_P2=triton.next_power_of_2(head_dim), PAGE_SIZE=16, EMULATE_FP8_ROUNDING=False)
    pointers = dict(k_ptr=ELEM[dtype], v_ptr=ELEM[dtype], k_cache_ptr=ELEM[cache_dtype], v_cache_ptr=ELEM[cache_dtype],
                    slot_ptr="*i64")
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if "scale" in name else "i32")
                 for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    if cache_dtype == "float8_e4m3fn":
        # Round to nearest even, saturating: the hardware conversion torch's cast matches.
        assert "cvt.rn.satfinite.e4m3x2" in ptx, "no saturating e4m3 conversion"
    print("CONFIG store", dtype, cache_dtype, num_kv_heads, head_dim, flush=True)
"""

SM90_STORE_CONFIGS = [
    ("bfloat16", "float8_e4m3fn", 8, 128),
    ("float16", "float8_e4m3fn", 2, 80),
    ("float32", "float8_e4m3fn", 8, 128),
    ("bfloat16", "bfloat16", 8, 128),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="compile-only check for machines without a GPU; "
                    "on a GPU the kernel itself runs in the tests above")
def test_store_kv_kernel_compiles_for_sm90_with_an_fp8_cache(tmp_path):
    """The FP8 attention kernel's sm_90 build is in test_kernels_attention's SM90_CONFIGS."""
    assert_builds_without_spills(SM90_STORE, SM90_STORE_CONFIGS, tmp_path)
