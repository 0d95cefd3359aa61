"""The Ray launcher's plan, pure Python over a list of `NodeInfo` (tested without Ray): which node
each process runs on, the host it binds, its bundle, the placement strategy, the KV transport and
the rendezvous host. `cluster.ray_launcher` makes the Ray calls that carry it out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tetriinfer.cluster.instance import InstanceConfig
from tetriinfer.cluster.plan import plan_instances, resolve_transport
from tetriinfer.cluster.zmq_io import Wire
from tetriinfer.config import ServeConfig

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
    if cfg.decode_tensor_parallel_size not in (None, cfg.engine.tensor_parallel_size):
        raise ValueError("the Ray launcher gives every instance one tensor-parallel size; a different "
                         "--decode-tensor-parallel-size needs --launcher local")
    tp = cfg.engine.tensor_parallel_size if on_gpu else 1  # CPU ranks share the instance's CPUs
    unit = "GPU" if on_gpu else "CPU"
    each = ("one each" if tp == 1 else f"tensor_parallel_size {tp} each") if on_gpu else "one each"
    # One instance takes `tp` GPUs (its ranks, all on one node) and one CPU (its engine loop), or one CPU.
    room = {x.node_id: min(x.num_gpus // tp, x.num_cpus) if on_gpu else x.num_cpus for x in nodes}
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
                         f"Ray node has room for {biggest} ({each}); use --kv-transport {other} "
                         f"to span nodes")
    else:
        total = sum(room.values())
        if total < n:
            have = sum(x.num_gpus for x in nodes) if on_gpu else total
            raise ValueError(f"{n} instances need {n * tp} {unit}s ({each}), but the Ray cluster has {have} "
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
                num_gpus=tp if on_gpu else 0, device="cuda" if on_gpu else "cpu", torch_threads=threads))

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
    """The cluster's plan (`cluster.plan`: roles, engines, transport), with each instance's host and threads."""
    configs = plan_instances(cfg, api_address=api_address, controller_address=controller_address,
                             kv_init_method=kv_init_method, devices=[p.device for p in plan.instances],
                             multi_node=plan.multi_node, wire=wire)
    return [dataclasses.replace(c, host=p.host, torch_threads=p.torch_threads)
            for c, p in zip(configs, plan.instances)]


def remote_instances(plan: RayPlan) -> frozenset[int]:
    """Instances on other nodes than the controller's: their pids mean nothing on its node, so the
    controller judges them by their heartbeat alone."""
    return frozenset(i for i, p in enumerate(plan.instances) if p.node_id != plan.controller.node_id)


def assigned_devices(node_ids: list[str], gpu_ids: list[list[str]], tp: int = 1) -> list[tuple[str, str]]:
    """(CUDA_VISIBLE_DEVICES, device) per GPU instance from the GPU ids Ray assigned it.

    Instances on one node all see the GPUs this cluster holds there, so CUDA IPC can open a peer's
    memory: each instance's own `tp` GPUs side by side (its tensor-parallel ranks use `device`,
    `device`+1, ...), instances ordered by their lowest GPU id. `device` is the first of its GPUs.
    """
    def gpu_order(g: str) -> tuple[int, str]:
        return len(g), g

    for ids in gpu_ids:
        if len(ids) != tp:
            raise ValueError(f"each instance needs exactly {tp} GPU(s) (its tensor-parallel ranks), "
                             f"Ray assigned {ids}")
    own = [sorted(ids, key=gpu_order) for ids in gpu_ids]
    blocks: dict[str, list[list[str]]] = {}
    for node, ids in zip(node_ids, own):
        blocks.setdefault(node, []).append(ids)
    visible = {node: [g for block in sorted(b, key=lambda blk: gpu_order(blk[0])) for g in block]
               for node, b in blocks.items()}
    return [(",".join(visible[node]), f"cuda:{visible[node].index(ids[0])}") for node, ids in zip(node_ids, own)]
