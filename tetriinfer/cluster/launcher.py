"""The local launcher: one OS process per instance and one for the controller, on this machine,
started from the plan in `cluster.plan` (which the Ray launcher, `cluster.ray_launcher`, also uses).

Every child runs under `supervisor.supervised_main` (it dies with this process), keeps the config it
was started with, and can be killed and started again by the supervisor: the controller on the same
port, an instance with the same id, role, device and engine.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field

from tetriinfer.cluster.controller import ControllerConfig, run_controller
from tetriinfer.cluster.instance import InstanceConfig, run_instance
from tetriinfer.cluster.mps import MpsDaemon
from tetriinfer.cluster.plan import controller_config, instance_devices, plan_instances, restartable
from tetriinfer.cluster.supervisor import supervised_main
from tetriinfer.cluster.zmq_io import Wire
from tetriinfer.config import ServeConfig
from tetriinfer.net import free_port

log = logging.getLogger("tetriinfer.launcher")

STOP_GRACE_S = 1.0  # children's clean exit after a Shutdown, before SIGTERM (LocalCluster.stop)


@dataclass
class LocalCluster:
    """The controller and instance processes started on this machine (and the MPS daemon they
    share), with the configs to start each of them again."""

    controller_config: ControllerConfig
    instance_configs: list[InstanceConfig]
    controller: mp.process.BaseProcess | None = None
    instances: list[mp.process.BaseProcess | None] = field(default_factory=list)
    mps: MpsDaemon | None = None

    def __post_init__(self) -> None:
        self.restartable = restartable(self.instance_configs)
        self.controller_address = self.controller_config.wire.address(self.controller_config.host,
                                                                      self.controller_config.port)
        self.instances = self.instances or [None] * len(self.instance_configs)

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.instances) if p is not None and p.is_alive()]

    def controller_alive(self) -> bool:
        return self.controller is not None and self.controller.is_alive()

    def instance_pid(self, i: int) -> int | None:
        p = self.instances[i]
        return p.pid if p is not None else None

    def start_controller(self) -> None:
        """Start the controller; a second start is a restart: same port, rebuilding its view."""
        cfg = self.controller_config
        if self.controller is not None:
            _end(self.controller)
            cfg = dataclasses.replace(cfg, recovering=True)
        self.controller = _start_child(run_controller, cfg, "tetriinfer-controller")

    def start_instance(self, i: int) -> None:
        if self.instances[i] is not None:
            _end(self.instances[i])
        self.instances[i] = _start_child(run_instance, self.instance_configs[i], f"tetriinfer-instance-{i}")

    def kill_controller(self) -> None:
        _end(self.controller)

    def kill_instance(self, i: int) -> None:
        _end(self.instances[i])

    def stop(self, timeout_s: float = STOP_GRACE_S, term_s: float = 5.0) -> None:
        """Wait `timeout_s` for a clean exit (the client sent Shutdown), then SIGTERM (the
        children's cleanup runs as SystemExit) and wait `term_s`, then SIGKILL what is left.

        The grace is short: an idle child exits well within it once the Shutdown arrives, and the
        Shutdown can be lost (a controller still starting, or one that never got the message), so
        a long wait here was a long wait for nothing (an idle server took 12 s to exit)."""
        procs = [p for p in [self.controller, *self.instances] if p is not None]
        _join_all(procs, timeout_s)
        for p in procs:
            if p.is_alive():
                p.terminate()
        _join_all(procs, term_s)
        for p in procs:
            _end(p)
        if self.mps is not None:
            self.mps.stop()


def _join_all(procs: list[mp.process.BaseProcess], timeout_s: float) -> None:
    """Return once every process in `procs` has exited, or after `timeout_s`."""
    from multiprocessing.connection import wait

    deadline = time.monotonic() + timeout_s
    while (alive := [p.sentinel for p in procs if p.is_alive()]) and time.monotonic() < deadline:
        wait(alive, max(0.0, deadline - time.monotonic()))


def _start_child(entry, config, name: str) -> mp.process.BaseProcess:
    ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or zmq state
    p = ctx.Process(target=supervised_main, args=(entry, config, os.getpid()), name=name, daemon=True)
    p.start()
    return p


def _end(p: mp.process.BaseProcess | None) -> None:
    """SIGKILL (a frozen process ignores anything else) and reap it: no zombie is left."""
    if p is None:
        return
    if p.is_alive():
        p.kill()
    p.join(5)


def start_local(cfg: ServeConfig, api_address: str, wire: Wire) -> LocalCluster:
    import torch

    host = "127.0.0.1"
    num_gpus = torch.cuda.device_count() if cfg.engine.device == "cuda" else 0
    devices = instance_devices(cfg, num_gpus)
    mps = MpsDaemon.start() if cfg.mps_sm_shares else None  # before any process: nothing to clean up if it fails
    controller_cfg = controller_config(cfg, api_address, host, free_port(host), wire=wire)
    controller_address = wire.address(host, controller_cfg.port)
    kv_init = f"tcp://{host}:{free_port(host)}"
    configs = plan_instances(cfg, api_address=api_address, controller_address=controller_address,
                             kv_init_method=kv_init, devices=devices, host=host, wire=wire)
    if mps is not None:
        configs = [dataclasses.replace(c, env=mps.instance_env(c.role, cfg.mps_sm_shares)) for c in configs]
    cluster = LocalCluster(controller_cfg, configs, mps=mps)
    cluster.start_controller()
    for i in range(len(configs)):
        cluster.start_instance(i)
    return cluster
