"""The Ray launcher (`tetriinfer serve --launcher ray`): the controller and every instance run as
Ray actors, their resources reserved at once by one placement group.

The plan (which node each process runs on, the host it binds, its bundle, the placement strategy,
the KV transport and the rendezvous host) is pure Python over a list of `NodeInfo`, so it is tested
without Ray; the Ray calls in `start_ray` stay thin. Every bundle is pinned to its planned node with
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

from tetriinfer.cluster.controller import run_controller
from tetriinfer.cluster.instance import InstanceConfig, run_instance
from tetriinfer.cluster.launcher import controller_config, free_port, plan_instances, resolve_transport
from tetriinfer.cluster.zmq_io import Wire
from tetriinfer.config import ServeConfig

log = logging.getLogger("tetriinfer.ray")

RAY_MISSING = "the Ray launcher needs ray: pip install 'tetriinfer[ray]'"
ONE_HOST_TRANSPORTS = ("shm", "cuda_ipc")  # KV moves through this host's memory or GPUs
GPU_TRANSPORTS = ("nccl", "cuda_ipc")
NODE_PIN = 0.001  # a sliver of the `node:<ip>` resource: pins a bundle to that node
WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "[::]")


@dataclass(frozen=True)
class NodeInfo:
    """One alive Ray node: what `ray.nodes()` reports, and whether this process runs on it."""

    node_id: str
    ip: str
    num_cpus: int
    num_gpus: int = 0
    is_driver: bool = False


@dataclass(frozen=True)
class Placement:
    """Where one process (the controller or an instance) runs and what it reserves."""

    bundle_index: int
    node_id: str
    host: str  # the node's IP: the process binds its ZeroMQ inbox here
    num_cpus: int
    num_gpus: int
    device: str = "cpu"  # "cuda": the GPU Ray assigns, as cuda:<k> inside the actor (assigned_devices)
    torch_threads: int | None = None

    @property
    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": float(self.num_cpus), f"node:{self.host}": NODE_PIN}
        if self.num_gpus:
            bundle["GPU"] = float(self.num_gpus)
        return bundle


@dataclass(frozen=True)
class RayPlan:
    strategy: str  # placement group strategy: PACK (one node) or SPREAD
    transport: str  # the resolved KV transport
    controller: Placement
    instances: list[Placement]
    rendezvous_host: str  # instance 0's node: rank 0 hosts the torch.distributed store

    @property
    def bundles(self) -> list[dict[str, float]]:
        return [self.controller.bundle, *(p.bundle for p in self.instances)]

    @property
    def num_nodes(self) -> int:
        return len({p.node_id for p in self.instances})

    @property
    def multi_node(self) -> bool:
        return self.num_nodes > 1


def _uses_gpus(cfg: ServeConfig) -> bool:
    device = cfg.engine.device
    if device == "cuda":
        return True
    if device == "cpu":
        return False
    if device.startswith("cuda:"):
        raise ValueError(f"device {device!r}: under Ray each instance gets the one GPU Ray assigns; use --device cuda")
    raise ValueError(f"device {device!r} is not supported by the Ray launcher; use cpu or cuda")


def plan_placement(cfg: ServeConfig, nodes: list[NodeInfo]) -> RayPlan:
    """Decide the node, host, bundle and device of the controller and of every instance.

    One node when it has room for every instance (the driver's node first), so the fast one-host
    transports work; otherwise the instances span nodes (biggest first), which needs a network
    transport (gloo on CPU, nccl on GPU). The controller takes one CPU, on the driver's node when
    one is left there. Raises ValueError when the cluster cannot hold the plan.
    """
    if not nodes:
        raise ValueError("the Ray cluster has no alive node")
    on_gpu = _uses_gpus(cfg)
    requested = cfg.kv_transport
    if requested in GPU_TRANSPORTS and not on_gpu:
        raise ValueError(f"kv_transport {requested!r} moves KV between GPUs; the engine device is "
                         f"{cfg.engine.device!r} (use gloo or shm on CPU)")
    n = cfg.total_instances
    unit = "GPU" if on_gpu else "CPU"
    # One instance takes one GPU and one CPU (its engine loop), or one CPU.
    room = {x.node_id: min(x.num_gpus, x.num_cpus) if on_gpu else x.num_cpus for x in nodes}
    # Driver's node first (the API talks to everyone from there), then the biggest.
    order = sorted(nodes, key=lambda x: (not x.is_driver, -room[x.node_id], x.ip, x.node_id))

    # KV moves only in disaggregated mode; colocated instances never hand a request over.
    one_host_only = cfg.mode == "disagg" and requested in ONE_HOST_TRANSPORTS
    fits_one = [x for x in order if room[x.node_id] >= n]
    counts: dict[str, int] = {}
    if fits_one:
        counts[fits_one[0].node_id] = n
    elif one_host_only:
        biggest = max(room.values())
        other = "nccl" if on_gpu else "gloo"
        raise ValueError(f"kv_transport {requested!r} needs all {n} instances on one node, but the biggest "
                         f"Ray node has room for {biggest} (one {unit} each); use --kv-transport {other} "
                         f"to span nodes")
    else:
        total = sum(room.values())
        if total < n:
            raise ValueError(f"{n} instances need {n} {unit}s (one each), but the Ray cluster has {total} "
                             f"on {len(nodes)} node(s)")
        left = n
        for node in order:  # fill the nodes in order
            take = min(room[node.node_id], left)
            if take > 0:
                counts[node.node_id] = take
                left -= take

    instances: list[Placement] = []
    for node in (x for x in order if x.node_id in counts):
        on_node = counts[node.node_id]
        threads = cfg.torch_threads
        if threads is None and not on_gpu:
            threads = max(1, node.num_cpus // on_node)  # the node's cores, shared by its instances
        for _ in range(on_node):
            instances.append(Placement(
                bundle_index=1 + len(instances), node_id=node.node_id, host=node.ip, num_cpus=1,
                num_gpus=1 if on_gpu else 0, device="cuda" if on_gpu else "cpu", torch_threads=threads))

    cpus_left = {x.node_id: x.num_cpus - counts.get(x.node_id, 0) for x in nodes}
    home = next((x for x in order if cpus_left[x.node_id] >= 1), None)
    if home is None:
        raise ValueError(f"no CPU is left for the controller: the {n} instances take every CPU of the Ray "
                         f"cluster; give it one more (ray start --num-cpus)")
    controller = Placement(0, home.node_id, home.ip, num_cpus=1, num_gpus=0)

    multi_node = len(counts) > 1
    transport = resolve_transport(cfg, [instances[0].device], multi_node)
    return RayPlan(strategy="SPREAD" if multi_node else "PACK", transport=transport, controller=controller,
                   instances=instances, rendezvous_host=instances[0].host)


def describe(plan: RayPlan) -> str:
    """One line for the log: which instances run where, and how KV moves."""
    hosts: dict[str, list[int]] = {}
    for i, p in enumerate(plan.instances):
        hosts.setdefault(p.host, []).append(i)
    where = ", ".join(f"{host}: {ids}" for host, ids in hosts.items())
    return (f"{len(plan.instances)} instance(s) on {plan.num_nodes} node(s) ({plan.strategy}; {where}), "
            f"controller on {plan.controller.host}, KV over {plan.transport}")


def reachable_address(address: str, host: str) -> str:
    """`tcp://0.0.0.0:5555` (a wildcard bind) as peers reach it: `tcp://<host>:5555`."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        raise ValueError(f"not a ZeroMQ tcp address: {address!r}")
    bind_host, _, port = rest.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"no port in address {address!r}")
    return f"{scheme}://{host}:{port}" if bind_host in WILDCARD_HOSTS else address


def instance_configs(cfg: ServeConfig, plan: RayPlan, *, api_address: str, controller_address: str,
                     kv_init_method: str, wire: Wire | None = None) -> list[InstanceConfig]:
    """The local launcher's plan (roles, engines, transport), with each instance's host and threads."""
    configs = plan_instances(cfg, api_address=api_address, controller_address=controller_address,
                             kv_init_method=kv_init_method, devices=[p.device for p in plan.instances],
                             multi_node=plan.multi_node, wire=wire)
    return [dataclasses.replace(c, host=p.host, torch_threads=p.torch_threads)
            for c, p in zip(configs, plan.instances)]


def remote_instances(plan: RayPlan) -> frozenset[int]:
    """Instances on other nodes than the controller's: their pids mean nothing on its node, so the
    controller judges them by their heartbeat alone."""
    return frozenset(i for i, p in enumerate(plan.instances) if p.node_id != plan.controller.node_id)


def assigned_devices(node_ids: list[str], gpu_ids: list[list[str]]) -> list[tuple[str, str]]:
    """(CUDA_VISIBLE_DEVICES, device) per GPU instance from the GPU ids Ray assigned it.

    Instances on one node all see the GPUs this cluster holds there (sorted), each using its own by
    position, so CUDA IPC can open a peer's memory.
    """
    for ids in gpu_ids:
        if len(ids) != 1:
            raise ValueError(f"each instance needs exactly one GPU, Ray assigned {ids}")
    held: dict[str, list[str]] = {}
    for node, ids in zip(node_ids, gpu_ids):
        held.setdefault(node, []).append(ids[0])
    visible = {node: sorted(ids, key=lambda g: (len(g), g)) for node, ids in held.items()}
    return [(",".join(visible[node]), f"cuda:{visible[node].index(ids[0])}") for node, ids in zip(node_ids, gpu_ids)]


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
    """The controller and instance actors on a Ray cluster, and their run futures."""

    controller_address: str
    controller: object  # actor handle
    instances: list  # actor handles, one per instance
    controller_run: object  # ObjectRef of the controller's run(): ready once it returned or died
    instance_runs: list
    placement_group: object
    plan: RayPlan
    owns_ray: bool = True  # this launcher connected to Ray, so it disconnects on stop
    _stopped: bool = field(default=False, repr=False)

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


def _teardown(actors: list, pg) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    for actor in actors:
        try:
            ray.kill(actor)
        except Exception as e:  # noqa: BLE001 - one already gone is fine
            log.debug("kill: %s", e)
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
            for i, (devices, device) in zip(on_gpu, assigned_devices(node_ids, gpu_ids)):
                visible[i] = devices
                engine = dataclasses.replace(configs[i].engine, device=device)
                configs[i] = dataclasses.replace(configs[i], engine=engine)
        instance_runs = [a.run.remote(run_instance, c, v) for a, c, v in zip(instances, configs, visible)]
    except BaseException:
        if pg is not None:
            _teardown(actors, pg)
        if owns_ray:
            ray.shutdown()
        raise
    return RayCluster(controller_address, controller, instances, controller_run, instance_runs, pg, plan, owns_ray)


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
    """One ProcessActor in its bundle; never restarted (the controller declares it dead instead)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=placement.bundle_index)
    return actor_cls.options(
        num_cpus=placement.num_cpus, num_gpus=placement.num_gpus, max_restarts=0, scheduling_strategy=strategy,
    ).remote()
