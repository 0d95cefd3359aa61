"""The engine's kernels, in two backends with one contract each: a plain torch reference ("torch",
any device) and Triton ("triton": GPUs, or the CPU under TRITON_INTERPRET=1 in tests).

| op | contract |
|---|---|
| `store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0)` | attention_ref.store_kv |
| `paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, out=None, *, k_scale=1.0, v_scale=1.0)` | attention_ref.paged_attention |
| `rope_store_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, out=None, k_scale=1.0, v_scale=1.0)` | rope.rope_store_kv_ref |
| `rms_norm(x, weight, eps, residual=None)` | norm.rms_norm_ref |
| `silu_and_mul(x)` | activation.silu_and_mul_ref |

The KV cache may be FP8 (torch.float8_e4m3fn, kv_cache_dtype='fp8') in both backends, with per-tensor
k_scale / v_scale (semantics in attention_ref; scales other than 1.0 need an FP8 cache).
The Triton ops never synchronise with the host, so CUDA graphs can capture a whole forward pass.
Importing this package never imports triton; only `get_kernels("triton")` does.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

KERNEL_BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Kernels:
    name: str
    store_kv: Callable[..., None]
    paged_attention: Callable[..., object]
    rope_store_kv: Callable[..., object]
    rms_norm: Callable[..., object]
    silu_and_mul: Callable[..., object]


def get_kernels(name: str) -> Kernels:
    """The ops of backend `name` ("torch" or "triton")."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(KERNEL_BACKENDS)}")
    if name == "torch":
        from tetriinfer.kernels import activation, attention_ref, norm, rope

        return Kernels(name, attention_ref.store_kv, attention_ref.paged_attention, rope.rope_store_kv_ref,
                       norm.rms_norm_ref, activation.silu_and_mul_ref)
    if importlib.util.find_spec("triton") is None:
        raise ImportError(
            "attention backend 'triton' needs the triton package (pip install 'tetriinfer[gpu]'), "
            "or use the 'torch' backend"
        )
    from tetriinfer.kernels import activation, attention_triton, norm, rope, store_kv_triton

    return Kernels(name, store_kv_triton.store_kv, attention_triton.paged_attention, rope.rope_store_kv_triton,
                   norm.rms_norm_triton, activation.silu_and_mul_triton)
