"""Attention kernels over the paged KV cache: a torch reference and a Triton backend.

Both backends implement the same two functions (see attention_ref.py for the contract):
`store_kv(k, v, k_cache, v_cache, slot_mapping)` and
`paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, out=None)`.
Importing this package never imports triton; only `get_attention_backend("triton")` does.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable

ATTENTION_BACKENDS = {
    "torch": "tetriinfer.kernels.attention_ref",
    "triton": "tetriinfer.kernels.attention_triton",
}


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    store_kv: Callable[..., None]
    paged_attention: Callable[..., object]


def get_attention_backend(name: str) -> AttentionBackend:
    """The attention functions of backend `name` ("torch" or "triton")."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(ATTENTION_BACKENDS)}")
    if name == "triton" and importlib.util.find_spec("triton") is None:
        raise ImportError(
            "attention backend 'triton' needs the triton package (pip install 'tetriinfer[gpu]'), "
            "or use the 'torch' backend"
        )
    module = importlib.import_module(ATTENTION_BACKENDS[name])
    store_kv = module.store_kv
    if name == "triton":  # the KV write without host synchronisation, so CUDA graphs can capture it
        store_kv = importlib.import_module("tetriinfer.kernels.store_kv_triton").store_kv
    return AttentionBackend(name=name, store_kv=store_kv, paged_attention=module.paged_attention)
