"""The Ray launcher (`tetriinfer serve --launcher ray`): the controller and every instance run as
Ray actors, their resources reserved at once by one placement group.

The plan (`cluster.ray_plan`: which node each process runs on, the host it binds, its bundle, the
placement strategy, the KV transport and the rendezvous host, over the launchers' shared
`cluster.plan`) is pure Python over a list of `NodeInfo`, so it is tested without Ray; the Ray calls in `start_ray` stay thin. Every bundle is pinned to its planned node with
Ray's per-node resource `node:<ip>`, so hosts and the transport are known before anything starts.

GPU instances take one GPU each. Ray would hide every other GPU of the node from an actor
(CUDA_VISIBLE_DEVICES), but CUDA IPC needs the peer's GPU visible, so each GPU instance sees the
GPUs this cluster holds on its node and uses its own by position: the same `cuda:i` view the local
launcher gives.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import traceback
from dataclasses import dataclass, field

from tetriinfer.cluster.controller import ControllerConfig, run_controller
from tetriinfer.cluster.instance import InstanceConfig, run_instance
from tetriinfer.cluster.plan import controller_config, restartable
from tetriinfer.cluster.ray_plan import (
    NodeInfo, Placement, RayPlan, assigned_devices, describe, instance_configs, plan_placement, reachable_address,
    remote_instances,
)
from tetriinfer.cluster.zmq_io import Wire
from tetriinfer.config import ServeConfig
from tetriinfer.net import free_port

log = logging.getLogger("tetriinfer.ray")

RAY_MISSING = "the Ray launcher needs ray: pip install 'tetriinfer[ray]'"


# ---- the Ray calls -------------------------------------------------------------------------------


class ProcessActor:
    """Runs one cluster process's entry point (controller or instance) inside a Ray actor."""

    def pid(self) -> int:
        return os.getpid()

    def free_port(self, host: str) -> int:
        return free_port(host)

    def gpu_ids(self) -> list[str]:
        import ray

        return [str(g) for g in ray.get_gpu_ids()]

    def run(self, entry, config, cuda_visible_devices: str | None = None) -> None:
        # Before anything initialises CUDA in this process: it reads the variable once.
        if cuda_visible_devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        try:
            entry(config)
        except BaseException:
            # An actor outlives an exception in its method; end the process as the local launcher's
            # would end, so the controller's checks and RayCluster.alive() see it die now.
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)


@dataclass
class RayCluster:
    """The controller and instance actors on a Ray cluster, and their run futures. The supervisor
    replaces a dead one with a new actor in the same placement-group bundle (same node, same GPU)."""

    controller_address: str
    controller: object  # actor handle
    instances: list  # actor handles, one per instance
    controller_run: object  # ObjectRef of the controller's run(): ready once it returned or died
    instance_runs: list
    placement_group: object
    plan: RayPlan
    owns_ray: bool = True  # this launcher connected to Ray, so it disconnects on stop
    actor_cls: object = None  # ray.remote(ProcessActor)
    controller_config: ControllerConfig | None = None
    instance_configs: list[InstanceConfig] = field(default_factory=list)
    visible_devices: list[str | None] = field(default_factory=list)  # CUDA_VISIBLE_DEVICES per instance
    pid_refs: list = field(default_factory=list)  # ObjectRef of each instance actor's pid
    _stopped: bool = field(default=False, repr=False)

    @property
    def restartable(self) -> bool:
        return bool(self.instance_configs) and restartable(self.instance_configs)

    def instance_pid(self, i: int) -> int | None:
        """The pid of instance i's actor, once it is known (never blocks)."""
        import ray

        if i >= len(self.pid_refs):
            return None
        done, _ = ray.wait([self.pid_refs[i]], timeout=0)
        try:
            return ray.get(done[0]) if done else None
        except ray.exceptions.RayError:
            return None

    def kill_controller(self) -> None:
        _kill(self.controller)

    def start_controller(self) -> None:
        """A restart: a new controller actor in the controller's bundle, on the same port."""
        _kill(self.controller)
        self.controller = _launch(self.actor_cls, self.placement_group, self.plan.controller)
        cfg = dataclasses.replace(self.controller_config, recovering=True)
        self.controller_run = self.controller.run.remote(run_controller, cfg)

    def kill_instance(self, i: int) -> None:
        _kill(self.instances[i])

    def start_instance(self, i: int) -> None:
        _kill(self.instances[i])
        actor = self.instances[i] = _launch(self.actor_cls, self.placement_group, self.plan.instances[i])
        self.pid_refs[i] = actor.pid.remote()  # runs before run(): an actor takes its calls in order
        self.instance_runs[i] = actor.run.remote(run_instance, self.instance_configs[i], self.visible_devices[i])

    def alive(self) -> list[int]:
        """Instances whose run() has neither returned nor died; a local, non-blocking check."""
        import ray

        refs = self.instance_runs
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        done = set(done)
        return [i for i, ref in enumerate(refs) if ref not in done]

    def controller_alive(self) -> bool:
        import ray

        done, _ = ray.wait([self.controller_run], timeout=0, fetch_local=False)
        return not done

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for a clean exit (the client sent Shutdown), then kill what is left."""
        import ray

        if self._stopped:
            return
        self._stopped = True
        runs = [self.controller_run, *self.instance_runs]
        ray.wait(runs, num_returns=len(runs), timeout=timeout_s, fetch_local=False)
        _teardown([self.controller, *self.instances], self.placement_group)
        if self.owns_ray:
            ray.shutdown()


def _kill(actor) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception as e:  # noqa: BLE001 - one already gone is fine
        log.debug("kill: %s", e)


def _teardown(actors: list, pg) -> None:
    from ray.util.placement_group import remove_placement_group

    for actor in actors:
        _kill(actor)
    if pg is not None:
        try:
            remove_placement_group(pg)
        except Exception as e:  # noqa: BLE001
            log.debug("remove placement group: %s", e)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError(RAY_MISSING) from None
    return ray


def cluster_nodes(ray) -> list[NodeInfo]:
    """The alive nodes, and which one this process (the driver) runs on."""
    driver = ray.get_runtime_context().get_node_id()
    return [NodeInfo(n["NodeID"], n["NodeManagerAddress"], int(n["Resources"].get("CPU", 0)),
                     int(n["Resources"].get("GPU", 0)), n["NodeID"] == driver)
            for n in ray.nodes() if n.get("Alive")]


def start_ray(cfg: ServeConfig, api_address: str, ray_address: str | None, wire: Wire | None = None) -> RayCluster:
    """Join (or start) a Ray cluster and launch the controller and instances on it.

    `ray_address` None: the cluster in $RAY_ADDRESS or the one last started on this machine, else
    a new local one (Ray's own rule). Returns once every process is launched; the API waits for
    their Ready messages.
    """
    if ray_address is not None and ray_address.startswith("ray://"):
        raise ValueError("Ray Client addresses (ray://) are not supported: run `tetriinfer serve` on a node of "
                         "the Ray cluster (the processes talk to it over ZeroMQ)")
    ray = _import_ray()
    owns_ray = not ray.is_initialized()
    if owns_ray:
        env = {k: os.environ[k] for k in ("TETRIINFER_LOG", "TETRIINFER_DATA_DIR") if k in os.environ}
        try:
            ray.init(address=ray_address, runtime_env={"env_vars": env} if env else None)
        except ConnectionError as e:
            raise ValueError(f"cannot join the Ray cluster at {ray_address or 'auto'}: {e} (is it running? if it "
                             f"uses token authentication: export RAY_AUTH_MODE=token)") from None
    pg, actors = None, []
    try:
        nodes = cluster_nodes(ray)
        plan = plan_placement(cfg, nodes)
        driver_ip = next((n.ip for n in nodes if n.is_driver), None)
        if driver_ip is None:
            raise RuntimeError("this process's Ray node is not among the cluster's alive nodes")
        log.warning("Ray: %s", describe(plan))
        pg = _reserve(ray, plan, cfg.startup_timeout_s)
        actor_cls = ray.remote(ProcessActor)
        controller, *instances = actors = [_launch(actor_cls, pg, p) for p in [plan.controller, *plan.instances]]

        controller_port, kv_port = ray.get([
            controller.free_port.remote(plan.controller.host), instances[0].free_port.remote(plan.rendezvous_host)])
        api_address = reachable_address(api_address, driver_ip)
        controller_address = f"tcp://{plan.controller.host}:{controller_port}"
        controller_cfg = controller_config(cfg, api_address, plan.controller.host, controller_port,
                                           remote_instances(plan), wire)
        controller_run = controller.run.remote(run_controller, controller_cfg)

        configs = instance_configs(cfg, plan, api_address=api_address, controller_address=controller_address,
                                   kv_init_method=f"tcp://{plan.rendezvous_host}:{kv_port}", wire=wire)
        visible: list[str | None] = [None] * len(instances)
        on_gpu = [i for i, p in enumerate(plan.instances) if p.num_gpus]
        if on_gpu:
            gpu_ids = ray.get([instances[i].gpu_ids.remote() for i in on_gpu])
            node_ids = [plan.instances[i].node_id for i in on_gpu]
            for i, (devices, device) in zip(on_gpu, assigned_devices(node_ids, gpu_ids, cfg.engine.tensor_parallel_size)):
                visible[i] = devices
                engine = dataclasses.replace(configs[i].engine, device=device)
                configs[i] = dataclasses.replace(configs[i], engine=engine)
        pid_refs = [a.pid.remote() for a in instances]
        instance_runs = [a.run.remote(run_instance, c, v) for a, c, v in zip(instances, configs, visible)]
    except BaseException:
        if pg is not None:
            _teardown(actors, pg)
        if owns_ray:
            ray.shutdown()
        raise
    return RayCluster(controller_address, controller, instances, controller_run, instance_runs, pg, plan, owns_ray,
                      actor_cls, controller_cfg, configs, visible, pid_refs)


def _reserve(ray, plan: RayPlan, timeout_s: float):
    """The placement group holding every bundle, or a clear error when Ray cannot place it."""
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(plan.bundles, strategy=plan.strategy)
    ready, _ = ray.wait([pg.ready()], timeout=min(5.0, timeout_s))
    if not ready:  # resources held by other jobs, or an autoscaler adding nodes: say so, keep waiting
        log.warning("Ray: waiting up to %.0f s to reserve %s (free now: %s)", timeout_s, plan.bundles,
                    ray.available_resources())
        ready, _ = ray.wait([pg.ready()], timeout=max(0.0, timeout_s - 5.0))
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(f"Ray could not reserve the bundles {plan.bundles} within {timeout_s:.0f} s "
                           f"(free now: {ray.available_resources()}); other jobs may hold them")
    return pg


def _launch(actor_cls, pg, placement: Placement):
    """One ProcessActor in its bundle; never restarted by Ray (the supervisor starts a new one)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=placement.bundle_index)
    return actor_cls.options(
        num_cpus=placement.num_cpus, num_gpus=placement.num_gpus, max_restarts=0, scheduling_strategy=strategy,
    ).remote()
