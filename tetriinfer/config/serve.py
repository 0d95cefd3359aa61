"""`tetriinfer serve`: the serving cluster and its HTTP front."""

from __future__ import annotations

from dataclasses import dataclass, field

from tetriinfer.config.checks import check_choice, check_tensor_parallel_size
from tetriinfer.config.cluster import ClusterShape, FlipConfig, PolicyConfig
from tetriinfer.config.engine import EngineConfig

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
        check_choice("mode", self.mode, SERVE_MODES)
        if self.decode_tensor_parallel_size is not None:
            check_tensor_parallel_size(self.decode_tensor_parallel_size)
            if self.mode != "disagg":
                raise ValueError("decode_tensor_parallel_size is for decode instances: it needs the disagg mode")
        check_choice("baseline", self.baseline, COLOCATED_BASELINES)
        check_choice("kv_transport", self.kv_transport, KV_TRANSPORTS)
        check_choice("launcher", self.launcher, LAUNCHERS)
        check_choice("uvicorn_log_level", self.uvicorn_log_level, UVICORN_LOG_LEVELS)
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
