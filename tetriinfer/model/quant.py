"""FP8 W8A8 linear layers: FP8 (e4m3) weights with one scale per output channel, activations
quantized per token on the fly.

    y = (x_q * s_x) (W_q * s_w)^T = (x_q W_q^T) * s_x * s_w^T       x_q = x / s_x,  W_q = W / s_w

On Hopper (and Ada) the product runs in `torch._scaled_mm`, which applies both scales in its
epilogue, with the activations quantized by one Triton kernel (kernels.fp8_quant; `ACT_QUANT`);
elsewhere a reference path dequantizes to float32 and multiplies, so CPU tests run the same numbers
(up to float32 accumulation order); batches of at most `TRITON_W8A8_MAX_M` tokens multiply in a Triton
FP8 GEMM instead (kernels.fp8_gemm). Batches of at most `GEMV_MAX_M` tokens (decode at batch 1)
skip activation quantization: a Triton GEMV without tensor cores upcasts the FP8 weights; so
does a Triton W8A16 GEMM, tile by tile, for batches of at most `W8A16_MAX_M` (off by default).

Weights come either from a higher-precision checkpoint (or random weights), quantized at load
(`quantize_model_`, as vLLM's `--quantization fp8`), or from a checkpoint already in FP8 in the
compressed-tensors layout that Hugging Face's `quantization_config` describes (`fp8_checkpoint`):
`<layer>.weight` float8_e4m3fn [out, in] and `<layer>.weight_scale` float32 [out, 1] (per channel)
or [1] (per tensor), dynamic per-token input activations, the LM head left in high precision.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1e-12  # an all-zero row or token still gets a finite scale

# Switches for the CUDA path, read by fp8_linear at each call (so set them before CUDA graphs are
# captured); the environment gives the defaults, which reach tensor-parallel worker processes too.
# ACT_QUANT: "triton" (one fused kernel) or "torch" (quantize_per_token, ~7 launches per linear).
ACT_QUANT = os.environ.get("TETRIINFER_FP8_ACT_QUANT", "triton")
# GEMV_MAX_M: token counts up to this (<= kernels.fp8_quant.GEMV_MAX_ROWS) run the W8A16 GEMV;
# W8A16_MAX_M: token counts up to this run the W8A16 tensor-core GEMM (off by default);
# TRITON_W8A8_MAX_M: token counts up to this quantize the activations and multiply in
# kernels.fp8_gemm's Triton GEMM; above it, torch._scaled_mm. 0 turns any of them off. On an H100
# (gpu.md): the GEMV streams one token's projections at 87 us a layer against cuBLAS FP8's 130;
# from 2 to 16 tokens the Triton W8A8 GEMM makes a decode step 4-9% faster than the W8A16 GEMM
# did, and from 17 to 128 its layers are 12-30% faster than _scaled_mm's (scripts/w8a8_sweep.py).
GEMV_MAX_M = int(os.environ.get("TETRIINFER_FP8_GEMV_MAX_M", "1"))
W8A16_MAX_M = int(os.environ.get("TETRIINFER_FP8_W8A16_MAX_M", "0"))
TRITON_W8A8_MAX_M = int(os.environ.get("TETRIINFER_FP8_TRITON_W8A8_MAX_M", "128"))


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_q float8 [out, in], s_w float32 [out]) with each row's largest |w| mapped to FP8_MAX."""
    scale = (w.abs().amax(dim=1).float() / FP8_MAX).clamp(min=MIN_SCALE)
    return (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q float8 [T, K], s_x float32 [T, 1]): dynamic scales, one per token (row)."""
    # Multiplying by float32(1/448) is what `amax / 448` runs on CUDA (torch turns a division by a
    # Python scalar into a product with its reciprocal there, not on the CPU); written out, the scales
    # are the same on every device, and kernels.fp8_quant matches them bit for bit.
    scale = (x.abs().amax(dim=-1, keepdim=True).float() * (1.0 / FP8_MAX)).clamp(min=MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@functools.cache
def has_scaled_mm(device: torch.device) -> bool:
    """FP8 tensor cores with row-wise scales: CUDA compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def fp8_matmul_ref(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """The reference: dequantize both operands to float32, multiply."""
    return ((x_q.float() * x_scale) @ (w_q.float() * w_scale[:, None]).t()).to(out_dtype)


def fp8_matmul_scaled_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """Hopper's FP8 GEMM; W_q^T of a row-major [out, in] W_q is the column-major operand it wants."""
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale[None, :], out_dtype=out_dtype)


def w8a16_matmul_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The W8A16 reference: activations as they are, weights dequantized, float32 product in x's dtype."""
    return (x.float() @ (w_q.float() * w_scale[:, None]).t()).to(x.dtype)


def fp8_matmul_cuda(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 on a GPU with FP8 tensor cores, by the module's switches (no host sync)."""
    if has_triton() and x.shape[0] <= GEMV_MAX_M:
        from tetriinfer.kernels.fp8_quant import GEMV_MAX_ROWS, w8a16_gemv

        if x.shape[0] <= GEMV_MAX_ROWS:
            return w8a16_gemv(x, w_q, w_scale)
    if has_triton() and x.shape[0] <= W8A16_MAX_M:
        from tetriinfer.kernels.fp8_quant import W8A16_MAX_ROWS, w8a16_matmul

        if x.shape[0] <= W8A16_MAX_ROWS:  # the GEMM's largest row tile
            return w8a16_matmul(x, w_q, w_scale)
    if has_triton() and ACT_QUANT == "triton":
        from tetriinfer.kernels.fp8_quant import quantize_per_token_triton

        x_q, x_scale = quantize_per_token_triton(x)
    else:
        x_q, x_scale = quantize_per_token(x)
    if has_triton() and x.shape[0] <= TRITON_W8A8_MAX_M:
        from tetriinfer.kernels.fp8_gemm import w8a8_matmul

        return w8a8_matmul(x_q, x_scale, w_q, w_scale, x.dtype)
    return fp8_matmul_scaled_mm(x_q, x_scale, w_q, w_scale, x.dtype)


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               use_kernel: bool | None = None) -> torch.Tensor:
    """x [..., in] in bf16/fp16/fp32 through FP8 weights [out, in] -> [..., out] in x's dtype.
    `use_kernel`: force the GPU kernels (True: fp8_matmul_cuda) or the reference (False); None picks by
    device and shape."""
    x2 = x.reshape(-1, x.shape[-1])
    if use_kernel is None:
        # _scaled_mm wants K and N multiples of 16, and row-wise scales a bf16 output.
        use_kernel = (has_scaled_mm(x.device) and w_q.shape[0] % 16 == 0 and w_q.shape[1] % 16 == 0
                      and x.dtype == torch.bfloat16)
    if use_kernel:
        y = fp8_matmul_cuda(x2, w_q, w_scale)
    else:
        x_q, x_scale = quantize_per_token(x2)
        y = fp8_matmul_ref(x_q, x_scale, w_q, w_scale, x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w_q.shape[0])


def fp8_linears(model: nn.Module) -> list[nn.Module]:
    """The layers FP8 applies to: every projection inside the decoder layers (model.parallel.Linear);
    embeddings and the LM head stay in high precision, as vLLM and compressed-tensors keep them."""
    from tetriinfer.model.parallel import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def quantize_model_(model: nn.Module) -> None:
    """Replace every projection's weight by its FP8 quantization, in place (one layer at a time, so
    the peak memory is the high-precision model plus one layer's FP8 copy)."""
    for layer in fp8_linears(model):
        if layer.weight_scale is not None:
            continue  # already FP8 (loaded from an FP8 checkpoint)
        w_q, scale = quantize_weight(layer.weight.data)
        layer.weight = nn.Parameter(w_q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)


def prepare_fp8_(model: nn.Module) -> None:
    """Give every projection empty FP8 weight and scale parameters for an FP8 checkpoint to fill."""
    for layer in fp8_linears(model):
        out_features, in_features = layer.weight.shape
        device = layer.weight.device
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device),
                                    requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device),
                                          requires_grad=False)


def fp8_checkpoint(hf_config: dict) -> bool:
    """Whether a checkpoint's `quantization_config` says FP8 W8A8 weights in a layout we load (False
    for unquantized weights, with or without KV cache scales); a quantized layout we cannot run
    raises ValueError naming it. A `kv_cache_scheme` must be static 8-bit float per tensor: the
    checkpoint then holds per-layer k_scale / v_scale (model.loader), which an FP8 KV cache uses."""
    q = hf_config.get("quantization_config")
    if not q:
        return False
    method = q.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(f"checkpoint quantization {method!r} is not supported; FP8 checkpoints must be in the "
                         f"compressed-tensors layout (per-channel or per-tensor weight scales, dynamic per-token "
                         f"activations), or load a bf16 checkpoint with quantization='fp8'")
    kv = q.get("kv_cache_scheme")
    if kv and not (kv.get("type") == "float" and kv.get("num_bits") == 8 and kv.get("strategy") == "tensor"
                   and not kv.get("dynamic") and kv.get("symmetric", True)):
        raise ValueError(f"compressed-tensors kv_cache_scheme {kv} is not supported: only static 8-bit float "
                         f"scales, one per tensor (strategy 'tensor'), for the FP8 KV cache")
    if not q.get("config_groups"):
        return False  # the KV cache scales alone: the weights are in high precision
    ignored = [name for name in q.get("ignore") or () if name != "lm_head"]
    if ignored:
        raise ValueError(f"compressed-tensors checkpoint leaves {ignored[:4]} unquantized; only the LM head may be")
    for name, group in (q.get("config_groups") or {}).items():
        weights, acts = group.get("weights") or {}, group.get("input_activations") or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8 \
                or weights.get("strategy") not in ("channel", "tensor"):
            raise ValueError(f"compressed-tensors group {name!r}: only 8-bit float weights with channel or tensor "
                             f"scales are supported, got {weights}")
        if acts and not (acts.get("type") == "float" and acts.get("num_bits") == 8 and acts.get("dynamic")):
            raise ValueError(f"compressed-tensors group {name!r}: only dynamic 8-bit float activations are "
                             f"supported, got {acts}")
    return True


def kv_cache_torch_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: the model's dtype ("auto") or FP8 e4m3 ("fp8"). The FP8 cache
    has one scale per tensor and layer for K and one for V: calibrated ones from a compressed-tensors
    checkpoint (its `kv_cache_scheme`; model.loader sets them on the attention modules), else 1.0
    (vLLM's default): x is stored as x / scale, saturated at +-448 (attention_ref.store_kv). A cache
    of the model's dtype ignores the checkpoint's scales (layers.ForwardContext.kv_scales)."""
    return FP8 if kv_cache_dtype == "fp8" else dtype
