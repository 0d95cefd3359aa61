"""The Triton W8A8 GEMM (kernels.fp8_gemm) against model.quant.fp8_matmul_ref on random FP8 operands,
odd sizes included, in both operand orders; its input checks; and its sm_90 builds (FP8 tensor-core
dots, no register spills). On the CPU it runs under TRITON_INTERPRET=1 (conftest.py), in float32."""

from __future__ import annotations

import pytest
import torch

from sm90_utils import assert_builds_without_spills
from tetriinfer.kernels.fp8_gemm import w8a8_launch_config, w8a8_matmul
from tetriinfer.model.quant import fp8_matmul_ref, quantize_per_token, quantize_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def operands(m: int, k: int, n: int, seed: int = 0):
    """Per-token quantized activations of spread ranges and per-channel quantized weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 2, m)[:, None]
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, -1, n)[:, None]
    x_q, x_scale = quantize_per_token(x.to(DEVICE))
    w_q, w_scale = quantize_weight(w.to(DEVICE))
    return x_q, x_scale, w_q, w_scale


def assert_close_to_reference(y: torch.Tensor, want: torch.Tensor) -> None:
    # e4m3 products are exact in float32: only the summation order differs, and on Hopper the tensor
    # cores' narrower sums within a K tile (3-6e-4 on an H100; kernels.fp8_gemm), and the bf16 rounding.
    tol = 1.5e-3 if y.dtype == torch.float32 else 8e-3
    err = (y.float() - want.float()).abs() / want.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    assert err.max().item() <= tol, f"largest error {err.max().item():.3g} of a row's largest value"


@pytest.mark.parametrize("m, k, n", [(1, 64, 32), (7, 100, 33), (16, 256, 128), (33, 130, 70), (70, 512, 300)])
@pytest.mark.parametrize("swap", [True, False])
def test_w8a8_gemm_matches_the_dequantizing_reference_on_odd_sizes(m, k, n, swap):
    x_q, x_scale, w_q, w_scale = operands(m, k, n)
    for out_dtype in (torch.float32, torch.bfloat16):
        y = w8a8_matmul(x_q, x_scale, w_q, w_scale, out_dtype, SWAP=swap, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)
        assert y.shape == (m, n) and y.dtype == out_dtype
        assert_close_to_reference(y, fp8_matmul_ref(x_q, x_scale, w_q, w_scale, torch.float32))


@pytest.mark.parametrize("m, k", [(1, 256), (20, 256), (64, 256), (130, 256), (70, 8320)])
def test_w8a8_gemm_at_its_shipped_launch_config_covers_every_token(m, k):
    """The default tiles: a batch past one token tile still fills every row."""
    x_q, x_scale, w_q, w_scale = operands(m, k, 96, seed=m)
    y = w8a8_matmul(x_q, x_scale, w_q, w_scale, torch.float32)
    assert w8a8_launch_config(m, 256)["BLOCK_M"] <= 128
    assert_close_to_reference(y, fp8_matmul_ref(x_q, x_scale, w_q, w_scale, torch.float32))


def test_w8a8_gemm_of_nothing_is_empty_or_zero():
    x_q, x_scale, w_q, w_scale = operands(3, 16, 5)
    assert w8a8_matmul(x_q[:, :0], x_scale, w_q[:, :0], w_scale, torch.float32).eq(0).all()
    assert w8a8_matmul(x_q[:0], x_scale[:0], w_q, w_scale, torch.bfloat16).shape == (0, 5)


def test_w8a8_gemm_refuses_operands_it_cannot_multiply():
    x_q, x_scale, w_q, w_scale = operands(4, 32, 8)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        w8a8_matmul(x_q.float(), x_scale, w_q, w_scale, torch.float32)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        w8a8_matmul(x_q[:, :16], x_scale, w_q, w_scale, torch.float32)
    with pytest.raises(ValueError, match="scales"):
        w8a8_matmul(x_q, x_scale[:2], w_q, w_scale, torch.float32)


SM90_COMPILE = r"""
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tetriinfer.kernels import fp8_gemm

for m, k, extra in json.loads(sys.argv[1]):
    n = 4096
    cfg = {**fp8_gemm.w8a8_launch_config(m, k), **extra}
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    constexprs = dict(cfg, EVEN_K=k % cfg["BLOCK_K"] == 0, UPCAST=False, PROMOTE=True)
    pointers = {"xq_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "out_ptr": "*bf16"}
    kernel = fp8_gemm._w8a8_kernel
    signature = {a: "constexpr" if a in constexprs else pointers.get(a, "i32") for a in kernel.arg_names}
    # What the JIT specializes at run time: torch's pointers, and integers divisible by 16 (the
    # pipeliner needs those hints to stage the loads through shared memory).
    ints = dict(M=m, N=n, K=k, stride_xm=k, stride_wn=k, stride_om=n)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names)
             if a in pointers or (a in ints and ints[a] % 16 == 0)}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    assert "e4m3" in ptx and "wgmma" in ptx, "no FP8 warp-group product"
    assert k % 16 or "async_copy_global_to_local" in ttgir, "loads not staged through shared memory"
    print("CONFIG", m, k, extra, flush=True)
"""

SM90_CONFIGS = [
    (1, 4096, {}),
    (32, 4096, {}),
    (64, 14336, {}),
    (48, 4000, {}),  # K not a multiple of BLOCK_K: masked loads
    (128, 4096, {}),
    (256, 4096, {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3}),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="compile-only check for machines without a GPU")
def test_w8a8_gemm_compiles_to_fp8_tensor_core_products_on_sm90_without_spills(tmp_path):
    assert_builds_without_spills(SM90_COMPILE, SM90_CONFIGS, tmp_path)


@pytest.mark.gpu
def test_w8a8_gemm_captures_in_a_cuda_graph():
    x_q, x_scale, w_q, w_scale = operands(32, 512, 256)
    w8a8_matmul(x_q, x_scale, w_q, w_scale, torch.bfloat16)  # compile outside the capture
    out = {}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out["y"] = w8a8_matmul(x_q, x_scale, w_q, w_scale, torch.bfloat16)
    new = operands(32, 512, 256, seed=1)
    x_q.copy_(new[0])
    x_scale.copy_(new[1])
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to_reference(out["y"], fp8_matmul_ref(x_q, x_scale, w_q, w_scale, torch.float32))
