"""A cluster's scheduling policies, its shape, and the simulator's knobs (`tetriinfer simulate`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tetriinfer.config.checks import check_choice, check_tensor_parallel_size
from tetriinfer.config.engine import EngineSchedulerConfig
# Each policy's valid names live beside the policy in `sched` (plain constants, no torch).
from tetriinfer.sched.admission import ADMISSION_POLICIES
from tetriinfer.sched.dispatcher import DISPATCH_POLICIES
from tetriinfer.sched.monitor import DECODE, PREFILL
from tetriinfer.sched.prefill_queue import PREFILL_POLICIES
from tetriinfer.sched.router import DISAGG_POLICIES

# --- Cluster scheduling policies and the simulator ------------------------------------------------

# The systems `tetriinfer simulate` runs: `tetriinfer` (TetriInfer, with `PolicyConfig.disagg_policy`
# adaptive or paper), the colocated baselines `vllm` and `sarathi`, and `disagg`, a plain
# disaggregated baseline (prefill and decode instances, but FCFS, no length prediction,
# least-loaded dispatch, greedy admission). `disagg` here is not `ServeConfig.mode="disagg"`.
SYSTEMS = ("tetriinfer", "vllm", "sarathi", "disagg")
GPU_SHARING = ("time-slice", "mps")  # how instances on one GPU share it (sim/gpu.py)


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
    # Adaptive, tail-aware: a local prefill wins whenever it saves more than this much TTFT
    # (seconds), whatever it costs the running decodes (inf: only by the weighed price). A long
    # prompt the interference sent to a queued prefill instance was the TTFT tail at high load
    # (docs/adaptive.md, "Tail-aware routing and TPOT p99").
    local_ttft_margin_s: float = 0.1
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
        if not self.local_ttft_margin_s >= 0:
            raise ValueError(f"local_ttft_margin_s must be >= 0, got {self.local_ttft_margin_s}")
        if self.handoff_after_tokens < 1:
            raise ValueError(f"handoff_after_tokens must be >= 1, got {self.handoff_after_tokens}")
        check_choice("disagg_policy", self.disagg_policy, DISAGG_POLICIES)
        check_choice("prefill_policy", self.prefill_policy, PREFILL_POLICIES)
        if self.dispatch_policy is None:
            self.dispatch_policy = "power2" if self.disagg_policy == "paper" else "least_loaded"
        check_choice("dispatch_policy", self.dispatch_policy, DISPATCH_POLICIES)
        check_choice("admission_policy", self.admission_policy, ADMISSION_POLICIES)
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
    time-sliced, one forward step at a time, or under `gpu_sharing="mps"` step side by side on
    SM shares."""

    system: str = "tetriinfer"
    shape: ClusterShape = field(default_factory=ClusterShape)
    gpu: str = "h100"
    model: str = "llama3-8b"
    tp: int = 1  # every instance's EngineConfig.tensor_parallel_size, as the simulator prices it
    block_size: int = 16
    # Instances per GPU (its TP group), time-sliced by the driver as `serve --device cuda:0` runs
    # them; 1: each instance owns its GPU.
    instances_per_gpu: int = 1
    # "mps": they run at once, as under `serve --mps-sm-shares P,D`, prefill instances on P% of the
    # SMs and decode instances on D% (by the role they start in); colocated instances on all.
    gpu_sharing: str = "time-slice"
    mps_sm_shares: tuple[int, int] = (40, 60)

    def __post_init__(self) -> None:
        check_choice("system", self.system, SYSTEMS)
        check_tensor_parallel_size(self.tp)
        for name in ("block_size", "instances_per_gpu"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_choice("gpu_sharing", self.gpu_sharing, GPU_SHARING)
        if len(self.mps_sm_shares) != 2 or not all(1 <= x <= 100 for x in self.mps_sm_shares):
            raise ValueError(f"mps_sm_shares must be two percentages in 1..100, got {self.mps_sm_shares}")

    @property
    def colocated(self) -> bool:
        return self.system in ("vllm", "sarathi")

    @property
    def total_instances(self) -> int:
        return self.shape.total(self.colocated)

    def mps_share(self, role: str) -> float:
        """The fraction of its GPU's SMs an instance starting in `role` gets under MPS."""
        return {PREFILL: self.mps_sm_shares[0] / 100, DECODE: self.mps_sm_shares[1] / 100}.get(role, 1.0)


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
