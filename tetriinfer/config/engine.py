"""One engine's knobs: the model, its precision and devices, the paged KV cache, the step scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field

from tetriinfer.config.checks import check_tensor_parallel_size
from tetriinfer.sched.step_planner import STEP_POLICIES as ENGINE_STEP_POLICIES

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPES)  # "auto": `auto_dtype` picks one when the config is made
LOAD_FORMATS = ("auto", "safetensors", "dummy")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
QUANTIZATIONS = (None, "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass
class CacheConfig:
    """Paged KV cache capacity.

    `num_blocks` wins when given; otherwise the cache takes `memory_fraction` of the device's
    memory minus what the weights already use (default 0.9 on a GPU, 0.05 of RAM on a CPU).

    `enable_prefix_caching`: full blocks stay cached (evictable, LRU) after their request, keyed by
    their tokens and all before them, and a new request prefills only what no cached block holds.
    """

    block_size: int = 16
    num_blocks: int | None = None
    memory_fraction: float | None = None
    enable_prefix_caching: bool = True

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
    `chunk_size` tokens or one decode batch (prefill first). `whole` is vanilla vLLM: whole prompts
    up to `chunk_size` tokens per step, prefill first. `mixed` is the chunked-colocated baseline
    (Sarathi-Serve / vLLM V1): one step holds the running decodes plus prompt tokens up to
    `chunk_size` in total. `sched.step_planner` decides, in the engine and the simulator alike.

    `async_scheduling`: plan and queue step t+1 before reading back step t's tokens, so the CPU's
    work of a step overlaps the GPU's. Outputs then come one step later, and a request stopped by
    EOS or a stop string spends one wasted row in the step after. None (the default): on for CUDA
    devices, as in vLLM; off on the CPU, where the host runs the model and nothing would overlap.
    """

    chunk_size: int = 512
    max_num_seqs: int = 256
    step_policy: str = "chunked"
    pad_chunks: bool = True
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.step_policy not in ENGINE_STEP_POLICIES:
            raise ValueError(f"step_policy must be one of {ENGINE_STEP_POLICIES}, got {self.step_policy!r}")


def auto_dtype(model: str, device: str) -> str:
    """vLLM's `--dtype auto`: float32 on a CPU; on a GPU the checkpoint's 16-bit type (its
    config.json `torch_dtype`), bfloat16 for presets, Hub ids not downloaded yet and float32
    checkpoints (vLLM picks float16 for those; bfloat16 keeps float32's range)."""
    if not device.startswith("cuda"):
        return "float32"
    import json
    from pathlib import Path

    config = Path(model) / "config.json"
    if config.is_file():
        declared = json.loads(config.read_text()).get("torch_dtype")
        if declared in ("bfloat16", "float16"):
            return declared
    return "bfloat16"


@dataclass
class EngineConfig:
    """One engine instance: model, weights, device, cache and step policy.

    `tensor_parallel_size`: ranks one instance spans (Megatron splits of attention and MLP; rank 0
    is this process, one worker process per other rank; GPUs `device`, `device`+1, ...). The
    simulator prices the same knob (`ClusterConfig.tp`, as the instances' tensor_parallel_size).
    `quantization="fp8"`: W8A8, FP8 weights with per-output-channel scales and dynamic per-token
    activation scales, from a higher-precision checkpoint (quantized at load) or an FP8 one
    (compressed-tensors). `kv_cache_dtype="fp8"`: FP8 KV cache with per-tensor scales.
    """

    model: str = "tiny"
    dtype: str = "float32"
    device: str = "cpu"
    load_format: str = "auto"
    attention_backend: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    enforce_eager: bool = False  # no CUDA graphs (they are used on GPUs with the Triton backend)
    tensor_parallel_size: int = 1
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    # Keep each request's final hidden state at its last prompt token (`Request.prompt_hidden`, a
    # CPU float32 row): the features of the online length probe (`serve --predictor probe`).
    capture_prompt_hidden: bool = False
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: EngineSchedulerConfig = field(default_factory=EngineSchedulerConfig)

    def __post_init__(self) -> None:
        if self.dtype == "auto":
            self.dtype = auto_dtype(self.model, self.device)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        check_tensor_parallel_size(self.tensor_parallel_size)
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")

    @classmethod
    def from_flat(cls, model: str = "tiny", **kwargs) -> EngineConfig:
        """An engine config from one flat set of keywords, as `LLM(...)` and the command line give
        them: the fields of EngineConfig, CacheConfig and EngineSchedulerConfig side by side."""
        cache_keys = set(CacheConfig.__dataclass_fields__)
        sched_keys = set(EngineSchedulerConfig.__dataclass_fields__)
        engine_keys = set(cls.__dataclass_fields__) - {"cache", "scheduler", "model"}
        unknown = set(kwargs) - cache_keys - sched_keys - engine_keys
        if unknown:
            raise TypeError(f"unknown engine arguments: {', '.join(sorted(unknown))}")
        return cls(
            model=model,
            cache=CacheConfig(**{k: v for k, v in kwargs.items() if k in cache_keys}),
            scheduler=EngineSchedulerConfig(**{k: v for k, v in kwargs.items() if k in sched_keys}),
            **{k: v for k, v in kwargs.items() if k in engine_keys},
        )
