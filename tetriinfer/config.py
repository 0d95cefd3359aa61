"""Typed configuration for every knob: the one source of defaults.

The CLI, the offline `LLM`, the server and the simulator all build these objects; nothing else
keeps its own defaults. This module imports nothing heavy (no torch) so `sched` and `sim` can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
ENGINE_STEP_POLICIES = ("chunked", "mixed")


@dataclass
class CacheConfig:
    """Paged KV cache capacity.

    `num_blocks` wins when given; otherwise the cache takes `memory_fraction` of the device's
    memory minus what the weights already use (default 0.9 on a GPU, 0.05 of RAM on a CPU).
    """

    block_size: int = 16
    num_blocks: int | None = None
    memory_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.memory_fraction is not None and not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass
class EngineSchedulerConfig:
    """What one engine instance runs per step.

    `chunked` is the paper's prefill instance: a step is either one prefill chunk of exactly
    `chunk_size` tokens or one decode batch (prefill first). `mixed` is the chunked-colocated
    baseline (Sarathi-Serve / vLLM V1): one step holds the running decodes plus prompt tokens up to
    `chunk_size` in total.
    """

    chunk_size: int = 512
    max_num_seqs: int = 256
    step_policy: str = "chunked"
    pad_chunks: bool = True

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.step_policy not in ENGINE_STEP_POLICIES:
            raise ValueError(f"step_policy must be one of {ENGINE_STEP_POLICIES}, got {self.step_policy!r}")


@dataclass
class EngineConfig:
    """One engine instance: model, weights, device, cache and step policy."""

    model: str = "tiny"
    dtype: str = "float32"
    device: str = "cpu"
    load_format: str = "auto"
    attention_backend: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: EngineSchedulerConfig = field(default_factory=EngineSchedulerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
