"""Building blocks shared by the model families: norms, rotary embedding, paged attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tetriinfer.kernels import Kernels
from tetriinfer.kernels.attention_ref import FP8, to_cache_dtype


@dataclass
class ForwardContext:
    """Everything a forward pass needs besides token ids and positions.

    The model runner builds it per step. Tokens of one sequence are contiguous; trailing tokens past
    `query_start_loc[-1]` are chunk padding (their KV slot is -1, their output is ignored).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 for padding
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache)
    kernels: Kernels  # the ops every layer calls: one backend for the whole pass

    def kv_scales(self, layer_idx: int, k_scale: float, v_scale: float) -> dict[str, float]:
        """The k_scale / v_scale keywords of layer `layer_idx`'s KV store and attention: the
        checkpoint's scales for an FP8 cache; none for any other cache, which holds real values
        (vLLM ignores calibrated scales there too, and the kernels refuse scales other than 1.0)."""
        if self.kv_caches[layer_idx][0].dtype != FP8:
            return {}
        return {"k_scale": k_scale, "v_scale": v_scale}

    def attend(self, layer_idx: int, q: torch.Tensor, scale: float, **kv_scales: float) -> torch.Tensor:
        """Paged attention of q [T, heads, head_dim] over layer `layer_idx`'s cache (this step's K/V
        already stored), flattened to [T, heads * head_dim]. `kv_scales`: from `kv_scales`."""
        k_cache, v_cache = self.kv_caches[layer_idx]
        out = self.kernels.paged_attention(q, k_cache, v_cache, self.block_tables, self.query_start_loc,
                                           self.seq_lens, scale, **kv_scales)
        return out.flatten(1)


def kv_cache_scales(model: nn.Module) -> dict[int, tuple[float, float]]:
    """Each attention layer's (k_scale, v_scale) by layer index: the checkpoint's calibrated FP8 KV
    cache scales (model.loader), 1.0 where it has none."""
    return {m.layer_idx: (m.k_scale, m.v_scale) for m in model.modules() if hasattr(m, "k_scale")}


def imported_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """K or V exported by another instance (its raw cache values) in this cache's type. Both load the
    same checkpoint, so share its scales: FP8 KV holds x / scale and goes into an FP8 cache byte for
    byte; into any other cache it is read as float32(x) * scale, and real values into an FP8 cache
    are stored as x / scale."""
    if x.dtype == cache_dtype:
        return x
    if x.dtype == FP8:
        x = x.float() * scale
    return to_cache_dtype(x, cache_dtype, scale if cache_dtype == FP8 else 1.0)


class RMSNorm(nn.Module):
    """RMSNorm; with `residual`, first adds it (the residual stream) and returns (normed, new stream)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ctx: ForwardContext, residual: torch.Tensor | None = None):
        return ctx.kernels.rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of rotary embedding and the factor cos/sin are scaled by, for Hugging
    Face's `rope_scaling` kinds `default` (None), `linear`, `llama3` and `yarn`, computed as
    transformers computes them (float32 throughout, so positions map to bit-identical angles)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    kind = None if scaling is None else scaling["rope_type"]
    if kind is None:
        return inv_freq, 1.0
    if kind == "linear":  # positions divided by `factor`
        return inv_freq / scaling["factor"], 1.0
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    # llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim: int, base: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al., 2023): interpolate the low frequencies by `factor`, keep the high ones,
    ramp linearly between the dimensions that turn `beta_slow` and `beta_fast` times over the
    original context; cos/sin grow by the attention factor (`0.1 ln(factor) + 1` by default)."""
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dimension(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension(beta_fast), dimension(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    keep = 1 - ramp  # 1: extrapolate (the high frequencies), 0: interpolate
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Tables of rotate-half (GPT-NeoX style) RoPE, as Hugging Face's Llama/Qwen checkpoints expect;
    the rotation itself is fused into the KV write (`kernels.rope_store_kv`)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # [max_positions, head_dim // 2]; YaRN scales both, i.e. q and k, by its attention factor
        self.register_buffer("cos", freqs.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * attention_factor, persistent=False)
