"""The cluster's plan, shared by both launchers: which role, device and engine settings each instance
gets, the KV transport, the controller's and each instance's config, and whether an instance can
be replaced. `cluster.launcher` starts the plan as local processes; `cluster.ray_plan` adds where
each process runs on a Ray cluster, and `cluster.ray_launcher` starts it there.
"""

from __future__ import annotations

import dataclasses
import os

from tetriinfer.cluster.controller import ControllerConfig
from tetriinfer.cluster.instance import InstanceConfig
from tetriinfer.cluster.zmq_io import Wire
from tetriinfer.config import EngineConfig, ServeConfig
from tetriinfer.predictor.serving import reads_prompt_hidden
from tetriinfer.sched.monitor import COLOCATED, DECODE, PREFILL

# KV transports whose instances can be replaced one at a time (gloo and nccl form a process group
# of fixed membership at start).
REPLACEABLE_TRANSPORTS = ("shm", "cuda_ipc")


def instance_roles(cfg: ServeConfig) -> list[str]:
    if cfg.mode == "colocated":
        return [COLOCATED] * cfg.shape.num_instances
    return [PREFILL] * cfg.shape.num_prefill + [DECODE] * cfg.shape.num_decode


def instance_engine(cfg: ServeConfig, role: str, device: str) -> EngineConfig:
    """The engine of one instance. Prefill and decode instances share one engine setting (the
    paper's fixed-size chunks, or mixed steps under the adaptive policy), so a flip changes nothing
    in the engine; the colocated baselines get their step policy. Under `--predictor probe` every
    instance with a predictor (any may prefill: flips, adaptive local prefills) keeps the prompts'
    hidden states."""
    sched = cfg.engine.scheduler
    if role != COLOCATED and cfg.policy.disagg_policy == "adaptive":
        # Adaptive: a decode instance prefills beside its decodes, a prefill instance decodes
        # what it keeps; mixed steps do both, so a flip still changes nothing in the engine.
        sched = dataclasses.replace(sched, step_policy="mixed", pad_chunks=False)
    elif role == COLOCATED and cfg.baseline == "vllm":
        # Prefill first, whole prompts up to the token budget per step, never padded.
        sched = dataclasses.replace(sched, chunk_size=cfg.policy.max_num_batched_tokens, step_policy="whole",
                                    pad_chunks=False)
    elif role == COLOCATED:  # sarathi: decodes plus prompt chunks filling the token budget
        sched = dataclasses.replace(sched, step_policy="mixed", pad_chunks=False)
    return dataclasses.replace(cfg.engine, device=device, scheduler=sched,
                               tensor_parallel_size=cfg.tensor_parallel_size(role),
                               capture_prompt_hidden=role != COLOCATED and reads_prompt_hidden(cfg.predictor))


def instance_devices(cfg: ServeConfig, num_gpus: int) -> list[str]:
    """Each instance's first device. `cuda` gives the instances consecutive GPUs, as many each as
    its tensor-parallel size (its ranks count up from the first); an explicit `cuda:k` or `cpu` is
    shared by every instance (instances sharing a GPU, e.g. under MPS)."""
    sizes = [cfg.tensor_parallel_size(role) for role in instance_roles(cfg)]
    if cfg.engine.device != "cuda":
        return [cfg.engine.device] * len(sizes)
    if num_gpus < sum(sizes):
        each = "one each" if set(sizes) == {1} else "one per tensor-parallel rank"
        raise ValueError(f"{len(sizes)} instances need {sum(sizes)} GPUs ({each}), but {num_gpus} are visible")
    firsts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [f"cuda:{first}" for first in firsts]


def controller_config(cfg: ServeConfig, api_address: str, host: str, port: int | None,
                      remote_instances: frozenset[int] = frozenset(), wire: Wire | None = None) -> ControllerConfig:
    return ControllerConfig(
        api_address, cfg.total_instances, host, port, cfg.policy.monitor_interval_s, cfg.dead_after_s, cfg.flip,
        remote_instances, adaptive=cfg.mode == "disagg" and cfg.policy.disagg_policy == "adaptive",
        chunk_size=cfg.engine.scheduler.chunk_size, block_size=cfg.engine.cache.block_size,
        interference_weight=cfg.policy.interference_weight, local_ttft_margin_s=cfg.policy.local_ttft_margin_s,
        cache_aware=cfg.policy.cache_aware_routing and cfg.engine.cache.enable_prefix_caching, wire=wire)


def resolve_transport(cfg: ServeConfig, devices: list[str], multi_node: bool = False) -> str:
    if cfg.kv_transport != "auto":
        return cfg.kv_transport
    on_gpu = devices[0].startswith("cuda")
    if multi_node:
        return "nccl" if on_gpu else "gloo"
    return "cuda_ipc" if on_gpu else "shm"


def restartable(configs: list[InstanceConfig]) -> bool:
    """Whether a dead instance can be replaced: colocated instances move no KV; the others need a
    transport without a process group."""
    return all(c.role == COLOCATED or c.kv_transport in REPLACEABLE_TRANSPORTS for c in configs)


def plan_instances(cfg: ServeConfig, *, api_address: str, controller_address: str, kv_init_method: str,
                   devices: list[str], host: str = "127.0.0.1", multi_node: bool = False,
                   wire: Wire | None = None) -> list[InstanceConfig]:
    roles = instance_roles(cfg)
    transport = resolve_transport(cfg, devices, multi_node)
    threads = cfg.torch_threads
    if threads is None and devices[0] == "cpu":
        threads = max(1, (os.cpu_count() or 1) // len(roles))
    return [
        InstanceConfig(
            instance_id=i, role=role, engine=instance_engine(cfg, role, devices[i]), policy=cfg.policy,
            flip=cfg.flip, controller_address=controller_address, api_address=api_address, host=host,
            kv_transport=transport, kv_init_method=kv_init_method, world_size=len(roles),
            kv_timeout_s=cfg.kv_timeout_s, predictor=cfg.predictor, torch_threads=threads, wire=wire,
        )
        for i, role in enumerate(roles)
    ]
