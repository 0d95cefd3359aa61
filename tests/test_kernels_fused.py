"""Fused kernels of the layer hot path (RMSNorm + residual, SiLU-and-mul, RoPE + KV-cache write).

Each Triton kernel is checked against its torch reference on random inputs, and each reference
against Hugging Face's formula for the op (LlamaRMSNorm, LlamaMLP's act, apply_rotary_pos_emb).
Outputs and caches are filled with NaN before a call, so an element a kernel forgets to write (or
a padding slot it writes by mistake) shows. On machines without a GPU the kernels run under
TRITON_INTERPRET=1 (see conftest.py), which rounds float32 to bfloat16 by truncation where a GPU
rounds to nearest: 16-bit results get a loose tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sm90_utils import assert_builds_without_spills
from tetriinfer.kernels import attention_ref
from tetriinfer.kernels.activation import silu_and_mul_ref, silu_and_mul_triton
from tetriinfer.kernels.norm import rms_norm_ref, rms_norm_triton
from tetriinfer.kernels.rope import rope_store_kv_ref, rope_store_kv_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# 16-bit outputs: two units in the last place (an fp32 intermediate that lands near a rounding
# boundary may round either way; under the interpreter bfloat16 truncates, see the module doc).
LOW_PRECISION = {torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=1e-3)}
EXACT = dict(rtol=0, atol=0)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def strided_rows(x: torch.Tensor, extra: int = 7) -> torch.Tensor:
    """x as a view into a wider tensor: rows not contiguous, last dim unit-stride."""
    wide = torch.full((x.shape[0], x.shape[1] + extra), float("nan"), dtype=x.dtype, device=x.device)
    wide[:, : x.shape[1]] = x
    return wide[:, : x.shape[1]]


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


# ---------------------------------------------------------------- RMSNorm


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm.forward."""
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_reference_is_hugging_face_norm(dtype):
    x, residual = randn(4, 96, dtype=dtype, seed=1), randn(4, 96, dtype=dtype, seed=3)
    weight = randn(96, dtype=dtype, seed=2)
    torch.testing.assert_close(rms_norm_ref(x, weight, 1e-5), hf_rms_norm(x, weight, 1e-5), **EXACT)
    normed, summed = rms_norm_ref(x, weight, 1e-5, residual)
    torch.testing.assert_close(summed, x + residual, **EXACT)
    torch.testing.assert_close(normed, hf_rms_norm(x + residual, weight, 1e-5), **EXACT)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [64, 100, 129, 3584, 16384])
def test_rms_norm_triton_float32(hidden, with_residual):
    x = strided_rows(randn(3, hidden, seed=hidden))
    weight = randn(hidden, seed=1)
    residual = randn(3, hidden, seed=2) if with_residual else None
    out = nan_like(x)
    residual_out = nan_like(x) if with_residual else None
    got = rms_norm_triton(x, weight, 1e-6, residual, out=out, residual_out=residual_out)
    expected = rms_norm_ref(x, weight, 1e-6, residual)
    if with_residual:
        assert got[0] is out and got[1] is residual_out
        torch.testing.assert_close(residual_out, expected[1], **EXACT)
        expected = expected[0]
    else:
        assert got is out
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_triton_low_precision(dtype):
    x, residual = randn(5, 4096, dtype=dtype, seed=1), randn(5, 4096, dtype=dtype, seed=2)
    weight = randn(4096, dtype=dtype, seed=3)
    normed, summed = rms_norm_triton(x, weight, 1e-5, residual)
    expected_normed, expected_summed = rms_norm_ref(x, weight, 1e-5, residual)
    assert normed.dtype == dtype and summed.dtype == dtype
    torch.testing.assert_close(summed, expected_summed, **LOW_PRECISION[dtype])
    torch.testing.assert_close(normed, expected_normed, **LOW_PRECISION[dtype])
    torch.testing.assert_close(rms_norm_triton(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5), **LOW_PRECISION[dtype])


def test_rms_norm_triton_in_place_like_a_decoder_layer():
    """out=x, residual_out=residual: the hidden state becomes the norm, the residual the sum."""
    x, residual, weight = randn(6, 129, seed=1), randn(6, 129, seed=2), randn(129, seed=3)
    expected_normed, expected_summed = rms_norm_ref(x.clone(), weight, 1e-6, residual.clone())
    normed, summed = rms_norm_triton(x, weight, 1e-6, residual, out=x, residual_out=residual)
    assert normed is x and summed is residual
    torch.testing.assert_close(residual, expected_summed, **EXACT)
    torch.testing.assert_close(x, expected_normed, rtol=1e-5, atol=1e-5)


def test_rms_norm_triton_promotes_like_the_reference():
    """A float32 weight over bfloat16 activations gives float32, as in Hugging Face."""
    x, weight = randn(2, 64, dtype=torch.bfloat16), randn(64, seed=1)
    out = rms_norm_triton(x, weight, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm_ref(x, weight, 1e-6), **LOW_PRECISION[torch.bfloat16])


def test_rms_norm_triton_edge_cases():
    empty = torch.empty(0, 64, device=DEVICE)
    assert rms_norm_triton(empty, randn(64), 1e-6).shape == (0, 64)
    with pytest.raises(ValueError, match="above the kernel's limit"):
        rms_norm_triton(torch.empty(1, 16385, device=DEVICE), torch.empty(16385, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual must have"):
        rms_norm_triton(randn(2, 64), randn(64), 1e-6, randn(2, 64, dtype=torch.float16))


# ---------------------------------------------------------------- SiLU-and-mul


def test_silu_and_mul_reference_is_hugging_face_mlp_activation():
    x = randn(4, 2 * 96)
    gate, up = x[:, :96], x[:, 96:]
    torch.testing.assert_close(silu_and_mul_ref(x), F.silu(gate) * up, **EXACT)


@pytest.mark.parametrize("n", [64, 100, 1500])  # 1500: more than one column block, last one partial
def test_silu_and_mul_triton_float32(n):
    x = strided_rows(randn(3, 2 * n, seed=n) * 4)  # wide range: large |gate| saturates the sigmoid
    out = torch.full((3, n), float("nan"), device=DEVICE)
    assert silu_and_mul_triton(x, out=out) is out
    torch.testing.assert_close(out, silu_and_mul_ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_and_mul_triton_low_precision(dtype):
    x = randn(5, 2 * 1100, dtype=dtype, seed=1)
    out = silu_and_mul_triton(x)
    assert out.dtype == dtype and out.shape == (5, 1100)
    torch.testing.assert_close(out, silu_and_mul_ref(x), **LOW_PRECISION[dtype])


def test_silu_and_mul_triton_edge_cases():
    assert silu_and_mul_triton(torch.empty(0, 8, device=DEVICE)).shape == (0, 4)
    with pytest.raises(ValueError, match="not even"):
        silu_and_mul_triton(randn(2, 7))


# ---------------------------------------------------------------- RoPE + KV-cache write

MAX_POSITIONS = 200


def rotary_tables(head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [MAX_POSITIONS, head_dim / 2] in float32, as the model's RotaryEmbedding builds them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(MAX_POSITIONS, dtype=torch.float32), inv_freq)
    return freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)


def fused_qkv(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype, seed: int = 0):
    """q, k, v as the model gets them: head views into one fused qkv projection."""
    qkv = randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=seed)
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return q.unflatten(-1, (num_q_heads, head_dim)), k.unflatten(-1, (num_kv_heads, head_dim)), v.unflatten(
        -1, (num_kv_heads, head_dim)
    )


def rope_batch(num_tokens: int, num_blocks: int, block_size: int, seed: int = 0):
    """Unordered positions (up to the table's end) and distinct slots, every third token padding."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen)
    positions[0] = MAX_POSITIONS - 1
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1
    return positions.to(DEVICE), slots.to(DEVICE)


def nan_caches(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE), torch.full(
        shape, float("nan"), dtype=dtype, device=DEVICE
    )


def hf_apply_rotary(x: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor) -> torch.Tensor:
    """Hugging Face's apply_rotary_pos_emb (x * cos + rotate_half(x) * sin), cos/sin [T, D/2]."""
    cos = torch.cat((cos_half, cos_half), dim=-1).unsqueeze(1)
    sin = torch.cat((sin_half, sin_half), dim=-1).unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_rope_reference_is_hugging_face_rotary_then_store_kv():
    q, k, v = fused_qkv(7, 4, 2, 32, torch.float32)
    positions, slots = rope_batch(7, num_blocks=3, block_size=4)
    cos, sin = rotary_tables(32)
    expected_q = hf_apply_rotary(q, cos[positions], sin[positions])
    expected_k = hf_apply_rotary(k, cos[positions], sin[positions])
    expected_k_cache, expected_v_cache = nan_caches(3, 4, 2, 32, torch.float32)
    attention_ref.store_kv(expected_k, v, expected_k_cache, expected_v_cache, slots)

    k_cache, v_cache = nan_caches(3, 4, 2, 32, torch.float32)
    got_q = rope_store_kv_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    torch.testing.assert_close(got_q, expected_q, **EXACT)
    torch.testing.assert_close(k_cache, expected_k_cache, equal_nan=True, **EXACT)
    torch.testing.assert_close(v_cache, expected_v_cache, equal_nan=True, **EXACT)


def run_both_rope(num_q_heads, num_kv_heads, head_dim, dtype, num_tokens=8, num_blocks=3, block_size=4):
    """(Triton results, reference results), each as (q, k_cache, v_cache), from NaN-filled outputs."""
    q, k, v = fused_qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, seed=head_dim)
    cos, sin = rotary_tables(head_dim)
    positions, slots = rope_batch(num_tokens, num_blocks, block_size, seed=num_q_heads)
    results = []
    for fn in (rope_store_kv_triton, rope_store_kv_ref):
        k_cache, v_cache = nan_caches(num_blocks, block_size, num_kv_heads, head_dim, dtype)
        q_out = torch.full((num_tokens, num_q_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
        assert fn(q, k, v, positions, cos, sin, k_cache, v_cache, slots, out=q_out) is q_out
        results.append((q_out, k_cache, v_cache))
    # Exactly the real tokens' slots were written; the padding tokens' writes went nowhere.
    written = ~results[0][1].isnan().flatten(0, 1).all(dim=(1, 2))
    expected_written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    expected_written[slots[slots >= 0]] = True
    assert torch.equal(written, expected_written)
    return results


@pytest.mark.parametrize(
    "num_q_heads, num_kv_heads, head_dim",
    [(4, 2, 32), (8, 2, 64), (6, 2, 64), (4, 4, 128), (32, 8, 128), (2, 1, 80)],
)
def test_rope_store_kv_triton_float32_is_bit_exact(num_q_heads, num_kv_heads, head_dim):
    got, expected = run_both_rope(num_q_heads, num_kv_heads, head_dim, torch.float32)
    for name, g, e in zip(("q", "k_cache", "v_cache"), got, expected):
        torch.testing.assert_close(g, e, equal_nan=True, **EXACT, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_store_kv_triton_low_precision(dtype):
    got, expected = run_both_rope(8, 2, 128, dtype, block_size=8)
    for name, g, e in zip(("q", "k_cache", "v_cache"), got, expected):
        torch.testing.assert_close(g, e, equal_nan=True, **LOW_PRECISION[dtype], msg=lambda m: f"{name}: {m}")


def test_rope_store_kv_triton_default_out_int32_indices_and_empty_batch():
    q, k, v = fused_qkv(3, 2, 1, 32, torch.float32)
    cos, sin = rotary_tables(32)
    positions = torch.tensor([5, 0, 9], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([2, 0, 1], dtype=torch.int32, device=DEVICE)
    k_cache, v_cache = nan_caches(1, 4, 1, 32, torch.float32)
    got = rope_store_kv_triton(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    assert got.is_contiguous() and got.shape == q.shape
    expected = rope_store_kv_ref(q, k, v, positions, cos, sin, *nan_caches(1, 4, 1, 32, torch.float32), slots)
    torch.testing.assert_close(got, expected, **EXACT)
    empty = rope_store_kv_triton(q[:0], k[:0], v[:0], positions[:0], cos, sin, k_cache, v_cache, slots[:0])
    assert empty.shape == (0, 2, 32)


# ---------------------------------------------------------------- the kernels as a real GPU would build them

# Compiles each kernel to an sm_90 cubin without TRITON_INTERPRET (the interpreter accepts code that
# does not lower), with the ptxas in the triton wheel, and prints ptxas's register and spill counts.
# Strides are int32, as Triton specialises them at launch.
SM90_COMPILE = """
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tetriinfer.kernels import activation, norm, rope

ELEM = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}
FLOAT_ARGS = {"eps", "k_inv_scale", "v_inv_scale"}

def compile_sm90(kernel, constexprs, pointer_types, num_warps, **options):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointer_types.get(name, "fp32" if name in FLOAT_ARGS else "i32")
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps, **options}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

for kind, dtype_name, *shape in json.loads(sys.argv[1]):
    elem = ELEM[dtype_name]
    if kind == "rms_norm":
        (hidden,) = shape
        block, num_warps = norm.launch_config(hidden)
        ptrs = dict.fromkeys(["x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "residual_out_ptr"], elem)
        compiled = compile_sm90(norm.triton_kernel(), dict(BLOCK=block, HAS_RESIDUAL=True), ptrs, num_warps)
    elif kind == "silu_and_mul":
        ptrs = {"x_ptr": elem, "out_ptr": elem}
        compiled = compile_sm90(activation.triton_kernel(), dict(BLOCK=activation.BLOCK), ptrs, 4)
    else:  # rope, or rope_fp8: the same kernel writing an e4m3 KV cache
        num_q_heads, num_kv_heads, head_dim = shape
        ptrs = dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr", "q_out_ptr"], elem)
        ptrs.update(positions_ptr="*i64", slot_mapping_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32")
        if kind == "rope_fp8":
            ptrs.update(k_cache_ptr="*fp8e4nv", v_cache_ptr="*fp8e4nv")
        constexprs = dict(rope.kernel_constexprs(num_q_heads, num_kv_heads, head_dim, 16), EMULATE_FP8_ROUNDING=False)
        compiled = compile_sm90(rope.triton_kernel(), constexprs, ptrs, 4, enable_fp_fusion=False)
        # Bit-exact float32 RoPE needs every product rounded on its own, as torch does.
        assert "fma.rn.f32" not in compiled.asm["ptx"], "RoPE kernel contracted to FMA"
    assert compiled.asm["cubin"], "no cubin"
    print("CONFIG", kind, dtype_name, *shape, flush=True)
"""

SM90_CONFIGS = [
    ("rms_norm", "bfloat16", 16384),
    ("rms_norm", "float32", 16384),
    ("rms_norm", "bfloat16", 4096),
    ("rms_norm", "float16", 100),
    ("silu_and_mul", "bfloat16"),
    ("silu_and_mul", "float32"),
    ("rope", "bfloat16", 64, 8, 128),
    ("rope", "float32", 32, 8, 128),
    ("rope", "bfloat16", 4, 2, 32),
    ("rope_fp8", "bfloat16", 32, 8, 128),
]


def test_fused_kernels_compile_for_sm90_without_spills(tmp_path):
    assert_builds_without_spills(SM90_COMPILE, SM90_CONFIGS, tmp_path)


# ---------------------------------------------------------------- CUDA graph capture (GPU only)


@pytest.mark.gpu
def test_fused_kernels_capture_in_a_cuda_graph():
    """No host synchronisation in the wrappers: all three replay from a graph with new inputs."""
    x, residual, weight = randn(16, 256, seed=1), randn(16, 256, seed=2), randn(256, seed=3)
    gate_up = randn(16, 512, seed=4)
    q, k, v = fused_qkv(16, 4, 2, 64, torch.float32)
    cos, sin = rotary_tables(64)
    positions, slots = rope_batch(16, num_blocks=8, block_size=4)
    k_cache, v_cache = nan_caches(8, 4, 2, 64, torch.float32)
    normed, summed, act, q_rot = nan_like(x), nan_like(x), nan_like(gate_up[:, :256]), nan_like(q)

    def step():
        rms_norm_triton(x, weight, 1e-6, residual, out=normed, residual_out=summed)
        silu_and_mul_triton(gate_up, out=act)
        rope_store_kv_triton(q, k, v, positions, cos, sin, k_cache, v_cache, slots, out=q_rot)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.copy_(randn(16, 256, seed=5))
    q.copy_(randn(16, 4, 64, seed=6))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(normed, rms_norm_ref(x, weight, 1e-6, residual)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(act, silu_and_mul_ref(gate_up), rtol=1e-5, atol=1e-6)
    expected_k_cache, expected_v_cache = nan_caches(8, 4, 2, 64, torch.float32)
    expected_q = rope_store_kv_ref(q, k, v, positions, cos, sin, expected_k_cache, expected_v_cache, slots)
    torch.testing.assert_close(q_rot, expected_q, **EXACT)
    torch.testing.assert_close(k_cache, expected_k_cache, equal_nan=True, **EXACT)
