"""How the paged-attention kernel (`kernels.attention_triton`) is launched: its tile shape and its
split-KV count. Host-side choices only, from values known before the launch (no device sync, so a
CUDA graph can capture the launch); none of them changes the result, only the time.
`scripts/bench_attention.py` times them against the alternatives: where to retune.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

# Split-KV policy (flash-decoding: see attention_triton's module docstring).
H100_SMS = 132  # what the split count is chosen for where there is no GPU (the interpreter)
PROGRAMS_PER_SM = 4  # a few programs per SM, so every SM has loads in flight
MAX_KV_SPLITS = 32  # bounds the workspace and the merge's reads
MIN_SPLIT_TOKENS = 256  # shorter ranges cost more in launch, workspace and merge than they save


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # rows per program (query tokens x padded GQA group); >= 16 for tl.dot
    block_n: int  # keys per step of the KV walk; >= 16 for tl.dot
    num_warps: int
    num_stages: int = 3  # software-pipelined K/V loads in flight (Triton's default on NVIDIA)


def choose_tiles(decode_heavy: bool, head_dim: int, group: int, dtype: torch.dtype) -> TileConfig:
    """Tile sizes that compile without register spills for sm_90 (checked with ptxas in the tests).

    Decode-heavy batches (about one token per sequence) take the smallest tile tl.dot allows (16
    rows; a decode token fills only GROUP of them, which costs idle tensor-core rows, not memory
    traffic; a CUDA-core tile of GROUP rows compiles to ~2.5x the registers and 4x the instructions)
    and, in 16-bit, 128 keys a step (eight pages per load). Batches with prefill take more rows per
    K/V load, fewer when head_dim is large. The 16-bit shapes for head_dim <= 128 were chosen by
    timing on an H100; the others only compile without spills.
    """
    wide = triton.next_power_of_2(head_dim) > 128
    fp32 = dtype == torch.float32
    if decode_heavy and not wide and not fp32:
        # Measured on the H100 (scripts/bench_attention.py --decode-tiles, docs/benchmarks/gpu.md):
        # within 3% of the best of 48 shapes at batch 1-256 and 1k-4k contexts; 32 keys a step
        # with 3 stages was 7-49% slower.
        tiles = TileConfig(block_m=16, block_n=128, num_warps=4, num_stages=2)
    elif decode_heavy:
        tiles = TileConfig(block_m=16, block_n=16, num_warps=8 if wide and fp32 else 4)
    elif not wide and not fp32:
        # Measured on the H100 (scripts/bench_attention.py --prefill, docs/benchmarks/gpu.md): 4 warps
        # and 2 stages take 0.57x the time of 8 warps and 3 stages for a 2,048-token chunk.
        tiles = TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    elif not wide:
        tiles = TileConfig(block_m=64, block_n=32, num_warps=8)
    else:
        tiles = TileConfig(block_m=32, block_n=16 if fp32 else 32, num_warps=8)
    # A tile holds at least one token's whole GQA group.
    return TileConfig(max(tiles.block_m, triton.next_power_of_2(group)), tiles.block_n, tiles.num_warps, tiles.num_stages)


def choose_num_kv_splits(num_tiles: int, num_kv_heads: int, max_seq_len: int, num_sms: int = H100_SMS) -> int:
    """How many programs share each tile's keys: enough for PROGRAMS_PER_SM programs on every SM,
    at most MAX_KV_SPLITS, and none that would get fewer than MIN_SPLIT_TOKENS keys.

    Every argument is known on the host, so the choice needs no sync and survives CUDA-graph replay
    (where the real context lengths change under a fixed launch).
    """
    wanted = triton.cdiv(PROGRAMS_PER_SM * num_sms, max(num_tiles * num_kv_heads, 1))
    worthwhile = triton.cdiv(max_seq_len, MIN_SPLIT_TOKENS)
    return max(1, min(wanted, worthwhile, MAX_KV_SPLITS))


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a host-side property, no sync)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS
