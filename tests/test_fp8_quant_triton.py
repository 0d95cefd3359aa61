"""FP8 linear layers' Triton kernels (kernels.fp8_quant): the fused per-token activation quantization
against model.quant.quantize_per_token bit for bit (scales and e4m3 bits), the W8A16 GEMM against
w8a16_matmul_ref within a stated tolerance, fp8_linear's GPU dispatch, and both kernels as sm_90
builds them (no register spills, IEEE division).

On the CPU the kernels run under TRITON_INTERPRET=1 (conftest.py): there the e4m3 cast is emulated
(store_kv_triton.quantize_kv), bfloat16 dots run in float32, and float32 -> bfloat16 truncates.
"""

from __future__ import annotations

import pytest
import torch

from sm90_utils import assert_builds_without_spills
from tetriinfer.kernels.fp8_quant import quantize_per_token_triton, w8a16_gemv, w8a16_matmul
from tetriinfer.model import quant
from tetriinfer.model.quant import FP8, fp8_linear, quantize_per_token, quantize_weight, w8a16_matmul_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal FP8 tensors, where any NaN equals any NaN (e4m3 has two: 0x7F and 0xFF)."""
    both_nan = a.float().isnan() & b.float().isnan()
    return bool(((a.view(torch.uint8) == b.view(torch.uint8)) | both_nan).all())


def assert_quantized_like_torch(x: torch.Tensor) -> None:
    x_q, scale = quantize_per_token_triton(x)
    ref_q, ref_scale = quantize_per_token(x)
    assert x_q.dtype == FP8 and x_q.shape == x.shape and scale.dtype == torch.float32
    assert scale.shape == (x.shape[0], 1)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0, equal_nan=True)  # same bits
    assert same_bits(x_q, ref_q), f"{(x_q.view(torch.uint8) != ref_q.view(torch.uint8)).sum()} e4m3 values differ"


def activations(rows: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows of very different ranges (1e-3 .. 1e4, so some lie far past 448), one all zeros, one
    with a single outlier (the rest quantize to small e4m3 values and subnormals)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen) * torch.logspace(-3, 4, rows)[:, None]
    x[rows // 2] = 0
    x[-1, k // 2] = 3e4
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [1, 17, 4095, 14336, 20000])  # 20000: past one block, two passes
def test_fused_quantization_matches_torch_bit_for_bit(dtype, k):
    assert_quantized_like_torch(activations(7, k, dtype))


def test_fused_quantization_rounds_ties_to_even_and_saturates_like_torch():
    """Every e4m3 value, every midpoint between neighbours and the floats either side of it, in a row
    whose amax is 448 (scale ~1); the same row times values that push x / scale past 448 in a row
    with a larger amax; and -0.0."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[~grid.isnan()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    row = torch.cat([grid, mids, mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(-1e9)),
                     torch.tensor([-0.0])])
    x = torch.stack([row, row * 3.7, row * 1e-5, row * 2.0**-7])
    x[1, 0] = 1e6  # this row's scale is set by one huge value
    assert_quantized_like_torch(x.to(DEVICE))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf / inf
def test_fused_quantization_of_nan_and_inf_rows_follows_torch():
    """A NaN anywhere makes the row's amax, scale and every value NaN in torch; an infinity gives an
    infinite scale, zeros, and NaN where the infinity was."""
    x = torch.randn(3, 33)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    x[2, 9] = -float("inf")
    for dtype in (torch.float32, torch.bfloat16):
        assert_quantized_like_torch(x.to(dtype).to(DEVICE))


def test_fused_quantization_reads_strided_rows_and_takes_no_tokens():
    wide = activations(5, 300, torch.bfloat16)
    assert_quantized_like_torch(wide[:, :257])  # rows 300 apart, 257 wide
    x_q, scale = quantize_per_token_triton(torch.empty(0, 64, dtype=torch.bfloat16, device=DEVICE))
    assert x_q.shape == (0, 64) and scale.shape == (0, 1)


# ---------------------------------------------------------------- W8A16


def w8a16_operands(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, -1, n)[:, None]  # channels of different ranges
    w_q, w_scale = quantize_weight(w)
    return x, w_q.to(DEVICE), w_scale.to(DEVICE)


def assert_w8a16_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Two units in the last place of the output dtype, plus 2**-10 of the largest |value| for
    float32 sums taken in another order near zero. The products are exact in both (e4m3 x bf16 fits
    float32); the kernel scales the sum, the reference each weight, and the interpreter truncates to
    bfloat16 where torch rounds to nearest."""
    ulp = 2.0**-7 if ref.dtype == torch.bfloat16 else 2.0**-10
    diff, ref32 = (y.float() - ref.float()).abs(), ref.float().abs()
    bound = 2 * ulp * ref32 + 2.0**-10 * ref32.max()
    assert (diff <= bound).all(), f"max excess {(diff - bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 33, 17), (3, 100, 300), (16, 20, 512), (17, 1, 1000), (64, 48, 129),
                                   (1, 4096, 4096)])
def test_w8a16_gemm_matches_the_dequantized_reference(dtype, m, n, k):
    x, w_q, w_scale = w8a16_operands(m, n, k, dtype)
    y = w8a16_matmul(x, w_q, w_scale)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_w8a16_close(y, w8a16_matmul_ref(x, w_q, w_scale))


def test_w8a16_gemm_rejects_large_batches_and_float32():
    x, w_q, w_scale = w8a16_operands(65, 16, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="at most 64 rows"):
        w8a16_matmul(x, w_q, w_scale)
    with pytest.raises(ValueError, match="bf16/fp16"):
        w8a16_matmul(x[:4].float(), w_q, w_scale)
    assert w8a16_matmul(x[:0], w_q, w_scale).shape == (0, 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,split_k", [(1, 33, 17, 1), (2, 100, 1500, 1), (3, 9, 3000, 2), (4, 64, 2048, 3),
                                           (1, 4096, 4096, 1), (1, 48, 5000, 4)])
def test_w8a16_gemv_matches_the_dequantized_reference(dtype, m, n, k, split_k):
    """Odd sizes: columns past a BLOCK_N, K past a BLOCK_K, K split over programs (atomics)."""
    x, w_q, w_scale = w8a16_operands(m, n, k, dtype)
    y = w8a16_gemv(x, w_q, w_scale, split_k=split_k)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_w8a16_close(y, w8a16_matmul_ref(x, w_q, w_scale))


def test_w8a16_gemv_rejects_more_rows_than_it_serves_and_handles_empty_shapes():
    x, w_q, w_scale = w8a16_operands(5, 16, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="at most 4 rows"):
        w8a16_gemv(x, w_q, w_scale)
    with pytest.raises(ValueError, match="bf16/fp16"):
        w8a16_gemv(x[:1].float(), w_q, w_scale)
    assert w8a16_gemv(x[:0], w_q, w_scale).shape == (0, 16)
    assert not w8a16_gemv(x[:2, :0], w_q[:, :0], w_scale).any()


def test_one_token_takes_the_gemv_a_few_the_w8a16_gemm_then_the_triton_w8a8_gemm(monkeypatch):
    """fp8_linear's dispatch by token count: <= GEMV_MAX_M the GEMV, <= W8A16_MAX_M the W8A16 GEMM,
    <= TRITON_W8A8_MAX_M quantize + the Triton W8A8 GEMM (the real kernel, interpreted on the CPU),
    above all quantize + _scaled_mm (swapped here for the reference, as on the CPU)."""
    taken = []
    monkeypatch.setattr(quant, "has_triton", lambda: True)
    monkeypatch.setattr(quant, "GEMV_MAX_M", 1)
    monkeypatch.setattr(quant, "W8A16_MAX_M", 4)
    monkeypatch.setattr(quant, "TRITON_W8A8_MAX_M", 6)
    import tetriinfer.kernels.fp8_gemm as gemm
    import tetriinfer.kernels.fp8_quant as kernels
    monkeypatch.setattr(kernels, "w8a16_gemv", lambda *a: taken.append("gemv") or w8a16_matmul_ref(*a))
    monkeypatch.setattr(kernels, "w8a16_matmul", lambda *a: taken.append("w8a16") or w8a16_matmul_ref(*a))
    triton_w8a8 = gemm.w8a8_matmul
    monkeypatch.setattr(gemm, "w8a8_matmul", lambda *a: taken.append("triton w8a8") or triton_w8a8(*a))
    monkeypatch.setattr(quant, "fp8_matmul_scaled_mm", lambda *a: taken.append("w8a8") or quant.fp8_matmul_ref(*a))
    _, w_q, w_scale = w8a16_operands(1, 16, 32, torch.bfloat16)
    for m in (1, 2, 4, 5, 6, 7):
        x = torch.randn(m, 32, dtype=torch.bfloat16, device=DEVICE)
        y = fp8_linear(x, w_q, w_scale, None, use_kernel=True)
        reference = fp8_linear(x, w_q, w_scale, None, use_kernel=False)
        assert y.shape == (m, 16)
        torch.testing.assert_close(y.float(), reference.float(), atol=0.1 * reference.abs().max().item(), rtol=0)
    assert taken == ["gemv", "w8a16", "w8a16", "triton w8a8", "triton w8a8", "w8a8"]


# ---------------------------------------------------------------- fp8_linear's GPU path


def test_fp8_linear_gpu_path_uses_the_fused_quantization_and_w8a16_below_its_bound(monkeypatch):
    """On the CPU the _scaled_mm call is swapped for the reference matmul: with the fused kernel's
    bit-exact operands the result equals the reference path exactly; batches of at most W8A16_MAX_M
    tokens take the W8A16 GEMM instead."""
    monkeypatch.setattr(quant, "fp8_matmul_scaled_mm", quant.fp8_matmul_ref)
    monkeypatch.setattr(quant, "has_triton", lambda: True)
    x, w_q, w_scale = w8a16_operands(5, 48, 64, torch.bfloat16)
    bias = torch.randn(48, device=DEVICE).to(torch.bfloat16)
    x3 = x.reshape(5, 1, 64)
    reference = fp8_linear(x3, w_q, w_scale, bias, use_kernel=False)
    monkeypatch.setattr(quant, "ACT_QUANT", "triton")
    monkeypatch.setattr(quant, "W8A16_MAX_M", 0)
    monkeypatch.setattr(quant, "GEMV_MAX_M", 0)
    monkeypatch.setattr(quant, "TRITON_W8A8_MAX_M", 0)
    assert torch.equal(fp8_linear(x3, w_q, w_scale, bias, use_kernel=True), reference)
    calls = []
    monkeypatch.setattr(quant, "quantize_per_token", lambda t: calls.append(t) or quantize_per_token(t))
    fp8_linear(x3, w_q, w_scale, bias, use_kernel=True)
    assert not calls  # the fused kernel, not the torch ops
    monkeypatch.setattr(quant, "W8A16_MAX_M", 5)
    y = fp8_linear(x3, w_q, w_scale, bias, use_kernel=True)
    assert y.shape == (5, 1, 48) and not calls
    assert torch.equal(y.reshape(5, 48), w8a16_matmul(x, w_q, w_scale) + bias)


@pytest.mark.gpu
def test_fp8_linear_kernels_capture_in_a_cuda_graph():
    """No host synchronisation: quantize + _scaled_mm, quantize + the Triton W8A8 GEMM and W8A16
    replay from a graph with new inputs."""
    x, w_q, w_scale = w8a16_operands(8, 256, 512, torch.bfloat16)
    outs = {}
    paths = {"scaled_mm": (0, 0), "triton w8a8": (0, 8), "w8a16": (8, 0)}  # (W8A16_MAX_M, TRITON_W8A8_MAX_M)
    saved = quant.W8A16_MAX_M, quant.TRITON_W8A8_MAX_M

    def step():
        for path, (w8a16_bound, triton_bound) in paths.items():
            quant.W8A16_MAX_M, quant.TRITON_W8A8_MAX_M = w8a16_bound, triton_bound
            outs[path] = fp8_linear(x, w_q, w_scale, None)

    try:
        step()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        x.copy_(w8a16_operands(8, 256, 512, torch.bfloat16, seed=1)[0])
        graph.replay()
        torch.cuda.synchronize()
    finally:
        quant.W8A16_MAX_M, quant.TRITON_W8A8_MAX_M = saved
    expected = fp8_linear(x, w_q, w_scale, None, use_kernel=False).float()
    for path in ("scaled_mm", "triton w8a8"):
        assert ((outs[path].float() - expected).abs().max() / expected.abs().max()) < 2e-2, path
    assert_w8a16_close(outs["w8a16"], w8a16_matmul_ref(x, w_q, w_scale))


# ---------------------------------------------------------------- sm_90 builds

SM90_COMPILE = """
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tetriinfer.kernels import fp8_quant

ELEM = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}

def compile_sm90(kernel, constexprs, pointers, num_warps, num_stages=3):
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in kernel.arg_names}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})

for kind, dtype, *shape in json.loads(sys.argv[1]):
    if kind == "quant":
        (k,) = shape
        block, one_block, num_warps = fp8_quant.quant_launch_config(k)
        pointers = {"x_ptr": ELEM[dtype], "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}
        compiled = compile_sm90(fp8_quant._quantize_rows_kernel,
                                dict(BLOCK=block, ONE_BLOCK=one_block, EMULATE_FP8_ROUNDING=False), pointers, num_warps)
        ptx = compiled.asm["ptx"]
        # IEEE division, as torch's x.float() / scale; div.full / div.approx would move e4m3 ties.
        assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx, "inexact division"
        assert "cvt.rn.satfinite.e4m3x2" in ptx, "no saturating e4m3 conversion"
    elif kind == "gemv":
        cfg = fp8_quant.gemv_launch_config()
        num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        pointers = {"x_ptr": ELEM[dtype], "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "out_ptr": ELEM[dtype]}
        compiled = compile_sm90(fp8_quant._w8a16_gemv_kernel, dict(cfg, MAX_ROWS=fp8_quant.GEMV_MAX_ROWS, ATOMIC=False),
                                pointers, num_warps, num_stages)
    else:
        m, k = shape
        cfg = fp8_quant.w8a16_launch_config(m, k, getattr(torch, dtype))
        num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        pointers = {"x_ptr": ELEM[dtype], "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "out_ptr": ELEM[dtype]}
        compiled = compile_sm90(fp8_quant._w8a16_kernel, cfg, pointers, num_warps, num_stages)
    assert compiled.asm["cubin"], "no cubin"
    print("CONFIG", kind, dtype, *shape, flush=True)
"""

SM90_CONFIGS = [
    ("quant", "bfloat16", 4096),
    ("quant", "bfloat16", 14336),
    ("quant", "float32", 16384),
    ("quant", "float16", 17),
    ("quant", "bfloat16", 20000),  # two passes
    # One entry per distinct build (BLOCK_M, dtype, EVEN_K): a repeated one is cached, without a ptxas log.
    ("w8a16", "bfloat16", 1, 14336),
    ("w8a16", "bfloat16", 16, 4095),  # K not a multiple of BLOCK_K: masked loads
    ("w8a16", "bfloat16", 32, 4096),
    ("w8a16", "bfloat16", 64, 4096),
    ("w8a16", "float16", 5, 4096),
    ("gemv", "bfloat16", 1, 4096),
    ("gemv", "float16", 3, 14335),  # K not a multiple of BLOCK_K
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="compile-only check for machines without a GPU")
def test_fp8_kernels_compile_for_sm90_without_spills(tmp_path):
    assert_builds_without_spills(SM90_COMPILE, SM90_CONFIGS, tmp_path)


@pytest.mark.gpu
def test_w8a16_gemv_captures_in_a_cuda_graph():
    """The decode path at one token: no host synchronisation, so a graph replays it with new inputs."""
    x, w_q, w_scale = w8a16_operands(1, 256, 4096, torch.bfloat16)
    out = {}
    w8a16_gemv(x, w_q, w_scale)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out["y"] = w8a16_gemv(x, w_q, w_scale)
    x.copy_(w8a16_operands(1, 256, 4096, torch.bfloat16, seed=1)[0])
    graph.replay()
    torch.cuda.synchronize()
    assert_w8a16_close(out["y"], w8a16_matmul_ref(x, w_q, w_scale))
