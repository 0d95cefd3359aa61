"""Starting a cluster: the plan (which instance gets which role, device and engine settings) and
the local launcher (one OS process per instance and one for the controller, on this machine).

`plan_instances` is shared with the Ray launcher (`cluster.ray_launcher`), which places the same
processes on a Ray cluster instead.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import socket
import time
from dataclasses import dataclass

from tetriinfer.cluster.controller import ControllerConfig, run_controller
from tetriinfer.cluster.instance import InstanceConfig, run_instance
from tetriinfer.cluster.mps import MpsDaemon
from tetriinfer.cluster.zmq_io import Wire
from tetriinfer.config import EngineConfig, EngineSchedulerConfig, ServeConfig
from tetriinfer.sched.monitor import COLOCATED, DECODE, PREFILL

log = logging.getLogger("tetriinfer.launcher")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def instance_roles(cfg: ServeConfig) -> list[str]:
    if cfg.mode == "colocated":
        return [COLOCATED] * cfg.num_instances
    return [PREFILL] * cfg.num_prefill + [DECODE] * cfg.num_decode


def instance_engine(cfg: ServeConfig, role: str, device: str) -> EngineConfig:
    """The engine of one instance. Prefill and decode instances share one engine setting (the
    paper's fixed-size chunks, or mixed steps under the adaptive policy), so a flip changes nothing
    in the engine; the colocated baselines get their step policy."""
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
    return dataclasses.replace(cfg.engine, device=device, scheduler=sched)


def instance_devices(cfg: ServeConfig, num_gpus: int) -> list[str]:
    """`cuda` gives instance i the GPU i; an explicit `cuda:k` or `cpu` is used by every instance."""
    n = cfg.total_instances
    if cfg.engine.device != "cuda":
        return [cfg.engine.device] * n
    if num_gpus < n:
        raise ValueError(f"{n} instances need {n} GPUs (one each), but {num_gpus} are visible")
    return [f"cuda:{i}" for i in range(n)]


def controller_config(cfg: ServeConfig, api_address: str, host: str, port: int | None,
                      remote_instances: frozenset[int] = frozenset(), wire: Wire | None = None) -> ControllerConfig:
    return ControllerConfig(
        api_address, cfg.total_instances, host, port, cfg.monitor_interval_s, cfg.dead_after_s, cfg.flip,
        remote_instances, adaptive=cfg.mode == "disagg" and cfg.policy.disagg_policy == "adaptive",
        chunk_size=cfg.engine.scheduler.chunk_size, block_size=cfg.engine.cache.block_size,
        interference_weight=cfg.policy.interference_weight, wire=wire)


def resolve_transport(cfg: ServeConfig, devices: list[str], multi_node: bool = False) -> str:
    if cfg.kv_transport != "auto":
        return cfg.kv_transport
    on_gpu = devices[0].startswith("cuda")
    if multi_node:
        return "nccl" if on_gpu else "gloo"
    return "cuda_ipc" if on_gpu else "shm"


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


@dataclass
class LocalCluster:
    """The controller and instance processes started on this machine (and the MPS daemon they share)."""

    controller: mp.process.BaseProcess
    instances: list[mp.process.BaseProcess]
    controller_address: str
    mps: MpsDaemon | None = None

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.instances) if p.is_alive()]

    def controller_alive(self) -> bool:
        return self.controller.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for a clean exit (the client sent Shutdown), then kill what is left."""
        deadline = time.monotonic() + timeout_s
        for p in [self.controller, *self.instances]:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in [self.controller, *self.instances]:
            if p.is_alive():
                p.kill()
                p.join(2)
        if self.mps is not None:
            self.mps.stop()


def start_local(cfg: ServeConfig, api_address: str, wire: Wire) -> LocalCluster:
    import torch

    ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or zmq state
    host = "127.0.0.1"
    num_gpus = torch.cuda.device_count() if cfg.engine.device == "cuda" else 0
    devices = instance_devices(cfg, num_gpus)
    mps = MpsDaemon.start() if cfg.mps_sm_shares else None  # before any process: nothing to clean up if it fails
    controller_cfg = controller_config(cfg, api_address, host, free_port(host), wire=wire)
    controller_address = wire.address(host, controller_cfg.port)
    controller = ctx.Process(target=run_controller, args=(controller_cfg,), name="tetriinfer-controller", daemon=True)
    controller.start()
    kv_init = f"tcp://{host}:{free_port(host)}"
    instances = []
    for icfg in plan_instances(cfg, api_address=api_address, controller_address=controller_address,
                               kv_init_method=kv_init, devices=devices, host=host, wire=wire):
        if mps is not None:
            icfg = dataclasses.replace(icfg, env=mps.instance_env(icfg.role, cfg.mps_sm_shares))
        p = ctx.Process(target=run_instance, args=(icfg,), name=f"tetriinfer-instance-{icfg.instance_id}", daemon=True)
        p.start()
        instances.append(p)
    return LocalCluster(controller, instances, controller_address, mps)
