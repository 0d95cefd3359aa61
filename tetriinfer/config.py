"""Typed configuration for every knob: the one source of defaults.

The CLI, the offline `LLM`, the server and the simulator all build these objects; nothing else
keeps its own defaults. This module imports nothing heavy (no torch): only the policies' names,
from `sched`, so `sim` and every layer above can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Each policy's valid names live beside the policy in `sched` (plain constants, no torch).
from tetriinfer.sched.admission import ADMISSION_POLICIES
from tetriinfer.sched.dispatcher import DISPATCH_POLICIES
from tetriinfer.sched.prefill_queue import PREFILL_POLICIES
from tetriinfer.sched.router import DISAGG_POLICIES
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


def check_tensor_parallel_size(size: int) -> None:
    """One rule for the engine's knob and the simulator's (`ClusterConfig.tp`)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {size!r}")


# --- Cluster scheduling policies and the simulator ------------------------------------------------

# The systems `tetriinfer simulate` runs: `tetriinfer` (TetriInfer, with `PolicyConfig.disagg_policy`
# adaptive or paper), the colocated baselines `vllm` and `sarathi`, and `disagg`, a plain
# disaggregated baseline (prefill and decode instances, but FCFS, no length prediction,
# least-loaded dispatch, greedy admission). `disagg` here is not `ServeConfig.mode="disagg"`.
SYSTEMS = ("tetriinfer", "vllm", "sarathi", "disagg")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass
class PolicyConfig:
    """Every scheduling policy knob of one cluster (the `sched` objects read these).

    What one instance's step may hold (`chunk_size`, `max_num_seqs`) is the engine's knob
    (`EngineSchedulerConfig`), read by the real cluster and the simulator alike.
    `max_num_batched_tokens` bounds one whole-prompt prefill step of the `vllm` baseline.
    """

    disagg_policy: str = "adaptive"
    prefill_policy: str = "sjf"
    sort_window: int = 16
    # Which decode instance takes a prefilled request. None: the paper's `power2` under the paper
    # policy; `least_loaded` under adaptive, where prefill instances keep or move requests by load
    # and power2's heavy/light split left one decode instance with 2-3x the other's work.
    dispatch_policy: str | None = None
    admission_policy: str = "reserve_dynamic"
    bucket_size: int = 200
    predictor_accuracy: float = 0.749
    heavy_prompt_tokens: int = 512
    heavy_decode_tokens: int = 128
    max_num_batched_tokens: int = 2048
    # Adaptive disaggregation (sched.router): how much the slowdown a local prefill imposes on a
    # decode instance's running requests (seconds, summed over them) counts against prefilling there.
    interference_weight: float = 0.2
    # Adaptive: output tokens a prefill instance generates itself (the first, from the prefill,
    # included) before it offers a request to a decode instance. A request that ends by then never
    # moves, and the hand-off gap (KV move, admission) is spread over more tokens. 1: move at once.
    handoff_after_tokens: int = 8
    # Prefix caching: place each request where its prefix is cached, weighed against queues
    # (sched.global_scheduler, sched.router); off: least-loaded placement, blind to caches.
    cache_aware_routing: bool = True
    # How often the monitor collects instance loads and every policy above reads them (the paper
    # polls every 100 ms): the simulator's monitor and the served cluster's controller tick.
    monitor_interval_s: float = 0.1

    def __post_init__(self) -> None:
        if not self.interference_weight >= 0:
            raise ValueError(f"interference_weight must be >= 0, got {self.interference_weight}")
        if self.handoff_after_tokens < 1:
            raise ValueError(f"handoff_after_tokens must be >= 1, got {self.handoff_after_tokens}")
        _check_choice("disagg_policy", self.disagg_policy, DISAGG_POLICIES)
        _check_choice("prefill_policy", self.prefill_policy, PREFILL_POLICIES)
        if self.dispatch_policy is None:
            self.dispatch_policy = "power2" if self.disagg_policy == "paper" else "least_loaded"
        _check_choice("dispatch_policy", self.dispatch_policy, DISPATCH_POLICIES)
        _check_choice("admission_policy", self.admission_policy, ADMISSION_POLICIES)
        for name in ("sort_window", "bucket_size", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.monitor_interval_s > 0:
            raise ValueError(f"monitor_interval_s must be > 0, got {self.monitor_interval_s}")
        if not 0.0 <= self.predictor_accuracy <= 1.0:
            raise ValueError(f"predictor_accuracy must be in [0, 1], got {self.predictor_accuracy}")


@dataclass
class FlipConfig:
    """When an instance changes role (prefill <-> decode).

    An instance is a candidate once it has been underused (idle, or its load fraction below
    `load_threshold`) for `idle_s`, and only while the other role is under pressure. After a flip
    it may not flip again for `cooldown_s` (hysteresis); no role drops below its minimum count.
    """

    enabled: bool = False
    idle_s: float = 2.0
    load_threshold: float = 0.1
    cooldown_s: float = 10.0
    min_prefill: int = 1
    min_decode: int = 1
    flip_s: float = 0.006
    prefill_pressure_chunks: float = 8.0  # queued prompt tokens per prefill instance, in chunks
    decode_pressure: float = 0.9  # decode KV use fraction that counts as pressure

    def __post_init__(self) -> None:
        if self.min_prefill < 1 or self.min_decode < 1:
            raise ValueError("min_prefill and min_decode must be >= 1 so no role empties")
        if self.idle_s < 0 or self.cooldown_s < 0 or self.flip_s < 0:
            raise ValueError("idle_s, cooldown_s and flip_s must be >= 0")


@dataclass
class ClusterShape:
    """How many instances of each role: the one home of the cluster's shape, for the simulator
    (`ClusterConfig.shape`) and the served cluster (`ServeConfig.shape`). A disaggregated cluster
    runs `num_prefill` + `num_decode` instances, a colocated one `num_instances`; instance ids are
    prefill ids then decode ids (or the colocated ones)."""

    num_prefill: int = 1
    num_decode: int = 1
    num_instances: int = 1

    def __post_init__(self) -> None:
        for name in ("num_prefill", "num_decode", "num_instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def total(self, colocated: bool) -> int:
        return self.num_instances if colocated else self.num_prefill + self.num_decode


@dataclass
class ClusterConfig:
    """The simulated cluster: its system, its `shape`, and the hardware each instance is priced
    on. Instance `i` runs on GPU `i // instances_per_gpu`: instances sharing a GPU are
    time-sliced, one forward step at a time."""

    system: str = "tetriinfer"
    shape: ClusterShape = field(default_factory=ClusterShape)
    gpu: str = "h100"
    model: str = "llama3-8b"
    tp: int = 1  # every instance's EngineConfig.tensor_parallel_size, as the simulator prices it
    block_size: int = 16
    # Instances per GPU (its TP group), time-sliced by the driver as `serve --device cuda:0` runs
    # them; 1: each instance owns its GPU. MPS's concurrent sharing is not modelled.
    instances_per_gpu: int = 1

    def __post_init__(self) -> None:
        _check_choice("system", self.system, SYSTEMS)
        check_tensor_parallel_size(self.tp)
        for name in ("block_size", "instances_per_gpu"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def colocated(self) -> bool:
        return self.system in ("vllm", "sarathi")

    @property
    def total_instances(self) -> int:
        return self.shape.total(self.colocated)


@dataclass
class SLOConfig:
    """Latency targets for goodput; None means no target."""

    ttft_s: float | None = None
    tpot_s: float | None = None


@dataclass
class SimConfig:
    """One simulated run: cluster, policies, flip, SLOs, the seed of every random choice, and each
    instance's step shape (`scheduler.chunk_size`: the prefill chunk of TetriInfer and disagg and
    the per-step token budget of `sarathi`; `scheduler.max_num_seqs`), as a served engine has it."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    flip: FlipConfig = field(default_factory=FlipConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    seed: int = 0
    scheduler: EngineSchedulerConfig = field(default_factory=EngineSchedulerConfig)
    # Each instance's prefix cache holds at most this fraction of its KV capacity (0: no prefix
    # caching); requests' `hash_ids` name blocks of `hash_block_tokens` (Mooncake's traces: 512).
    prefix_cache_fraction: float = 1.0
    hash_block_tokens: int = 512

    def __post_init__(self) -> None:
        if not 0.0 <= self.prefix_cache_fraction <= 1.0:
            raise ValueError(f"prefix_cache_fraction must be in [0, 1], got {self.prefix_cache_fraction}")
        if self.hash_block_tokens < 1:
            raise ValueError(f"hash_block_tokens must be >= 1, got {self.hash_block_tokens}")


# --- The serving cluster (`tetriinfer serve`) -----------------------------------------------------

SERVE_MODES = ("disagg", "colocated")
COLOCATED_BASELINES = ("vllm", "sarathi")
KV_TRANSPORTS = ("auto", "shm", "gloo", "nccl", "cuda_ipc")
LAUNCHERS = ("local", "ray")
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass
class ServeConfig:
    """`tetriinfer serve`: the cluster's shape, its policies and the HTTP front.

    `mode="disagg"`: `shape.num_prefill` + `shape.num_decode` instances running TetriInfer, with
    `policy.disagg_policy` `adaptive` or `paper` (not the simulator's `disagg` baseline system, see
    `SYSTEMS`). `mode="colocated"`: `shape.num_instances` instances each running whole requests with the
    `baseline` step policy (`vllm`: prefill first, whole prompts up to `policy.max_num_batched_tokens`
    per step; `sarathi`: decodes plus prompt chunks up to `engine.scheduler.chunk_size` tokens per
    step). `engine` is the template every instance's engine is built from (its device `cuda`
    becomes the first GPU of instance i's `tensor_parallel_size`). `decode_tensor_parallel_size`
    gives decode instances another TP size than `engine.tensor_parallel_size` (the KV moves whole
    between them, gathered from and scattered to the rank shards); an instance keeps its size when
    it flips role.
    """

    mode: str = "disagg"
    shape: ClusterShape = field(default_factory=ClusterShape)
    baseline: str = "sarathi"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None  # the template text replacing the model's (--chat-template)
    # Requests' sampling defaults: "auto" the model's generation_config.json, "vllm" none, or a folder
    # holding a generation_config.json (vLLM's --generation-config)
    generation_config: str = "auto"
    enable_tokenizer_info_endpoint: bool = False  # GET /tokenizer_info (vLLM's flag, off there too)
    enable_auto_tool_choice: bool = False  # tool_choice "auto" (vLLM's flag; needs tool_call_parser)
    tool_call_parser: str | None = None  # how "auto" finds calls in the output (server.tool_parsers.PARSERS)
    reasoning_parser: str | None = None  # a chat reply's <think> part into `reasoning` (server.reasoning)
    uvicorn_log_level: str = "warning"
    kv_transport: str = "auto"
    kv_timeout_s: float = 30.0
    # Directory of a trained predictor; None: the shipped one; "static[:DIR]", "probe[:DIR]" (predictor.serving)
    predictor: str | None = None
    launcher: str = "local"
    dead_after_s: float = 5.0
    startup_timeout_s: float = 600.0
    torch_threads: int | None = None  # per CPU instance (default: cores / instances, at least 1)
    # Instances sharing a GPU under CUDA MPS: percent of the SMs for (prefill, decode) instances.
    mps_sm_shares: tuple[int, int] | None = None
    # Reliability (cluster.supervisor, cluster.client): requests without a first token beyond this
    # get a 429; SIGTERM/SIGINT drain in-flight requests at most this long; a request with no
    # output for this long fails.
    max_waiting_requests: int = 1024
    shutdown_timeout_s: float = 30.0
    request_idle_timeout_s: float = 600.0
    engine: EngineConfig = field(default_factory=EngineConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    flip: FlipConfig = field(default_factory=FlipConfig)
    decode_tensor_parallel_size: int | None = None  # None: engine.tensor_parallel_size

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, SERVE_MODES)
        if self.decode_tensor_parallel_size is not None:
            check_tensor_parallel_size(self.decode_tensor_parallel_size)
            if self.mode != "disagg":
                raise ValueError("decode_tensor_parallel_size is for decode instances: it needs the disagg mode")
        _check_choice("baseline", self.baseline, COLOCATED_BASELINES)
        _check_choice("kv_transport", self.kv_transport, KV_TRANSPORTS)
        _check_choice("launcher", self.launcher, LAUNCHERS)
        _check_choice("uvicorn_log_level", self.uvicorn_log_level, UVICORN_LOG_LEVELS)
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.kv_timeout_s <= 0 or self.dead_after_s <= 0:
            raise ValueError("kv_timeout_s and dead_after_s must be > 0")
        if self.max_waiting_requests < 1 or self.shutdown_timeout_s < 0 or self.request_idle_timeout_s <= 0:
            raise ValueError("max_waiting_requests must be >= 1, shutdown_timeout_s >= 0 and "
                             "request_idle_timeout_s > 0")
        if self.mps_sm_shares is not None:
            if self.mode != "disagg":
                raise ValueError("MPS SM shares are per role: they need the disagg mode (prefill and decode instances)")
            if len(self.mps_sm_shares) != 2 or not all(1 <= x <= 100 for x in self.mps_sm_shares):
                raise ValueError(f"mps_sm_shares must be two percentages in 1..100, got {self.mps_sm_shares}")

    @property
    def total_instances(self) -> int:
        return self.shape.total(self.mode == "colocated")

    def tensor_parallel_size(self, role: str) -> int:
        """The TP size of an instance started in `role` ("prefill", "decode" or "colocated")."""
        if role == "decode" and self.decode_tensor_parallel_size is not None:
            return self.decode_tensor_parallel_size
        return self.engine.tensor_parallel_size
