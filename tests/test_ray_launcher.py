"""The Ray launcher: its pure placement plan (no Ray needed), and with Ray installed the actors'
liveness checks and `tetriinfer serve --launcher ray` end to end on a local Ray."""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

import httpx
import pytest

from serve_utils import start_server, wait_until
from tetriinfer import LLM, SamplingParams
from tetriinfer.cluster.ray_launcher import RAY_MISSING, ProcessActor, RayCluster, start_ray
from tetriinfer.cluster.ray_plan import (
    NodeInfo, assigned_devices, describe, instance_configs, plan_placement, reachable_address, remote_instances,
)
from tetriinfer.config import ClusterShape, EngineConfig, ServeConfig
from tetriinfer.sched.monitor import COLOCATED, DECODE, PREFILL

REPO = Path(__file__).resolve().parents[1]


def serve_cfg(device: str = "cpu", prefill: int = 1, decode: int = 1, **kw) -> ServeConfig:
    return ServeConfig(shape=ClusterShape(prefill, decode), engine=EngineConfig(device=device), **kw)


HEAD = NodeInfo("head", "10.0.0.1", num_cpus=8, num_gpus=0, is_driver=True)


def gpu_node(name: str, ip: str, gpus: int, cpus: int = 32, driver: bool = False) -> NodeInfo:
    return NodeInfo(name, ip, num_cpus=cpus, num_gpus=gpus, is_driver=driver)


# ---- plan: CPU clusters ----------------------------------------------------------------------------
def test_cpu_one_node_packs_everything_on_the_driver_with_shared_memory():
    plan = plan_placement(serve_cfg(), [HEAD, NodeInfo("w", "10.0.0.2", 64)])
    assert plan.strategy == "PACK" and plan.transport == "shm" and not plan.multi_node
    assert [p.node_id for p in plan.instances] == ["head", "head"]
    assert [p.host for p in plan.instances] == ["10.0.0.1", "10.0.0.1"]
    assert plan.controller.node_id == "head" and plan.rendezvous_host == "10.0.0.1"
    assert all(p.device == "cpu" and p.num_gpus == 0 and p.num_cpus == 1 for p in plan.instances)
    assert [p.torch_threads for p in plan.instances] == [4, 4]  # the node's 8 cores over its 2 instances
    assert plan.bundles == [{"CPU": 1.0, "node:10.0.0.1": 0.001}] * 3  # controller first, then instances
    assert [p.bundle_index for p in [plan.controller, *plan.instances]] == [0, 1, 2]


def test_cpu_spans_nodes_with_gloo_when_no_node_holds_every_instance():
    nodes = [NodeInfo("a", "10.0.0.1", 2, is_driver=True), NodeInfo("b", "10.0.0.2", 2),
             NodeInfo("c", "10.0.0.3", 3)]
    plan = plan_placement(serve_cfg(prefill=1, decode=3), nodes)
    assert plan.strategy == "SPREAD" and plan.transport == "gloo" and plan.num_nodes == 2
    # The driver's node first, then the biggest; each full before the next.
    assert [p.node_id for p in plan.instances] == ["a", "a", "c", "c"]
    assert [p.host for p in plan.instances] == ["10.0.0.1", "10.0.0.1", "10.0.0.3", "10.0.0.3"]
    assert [p.torch_threads for p in plan.instances] == [1, 1, 1, 1]
    assert plan.rendezvous_host == "10.0.0.1"  # instance 0 (rank 0) hosts the store
    assert plan.controller.node_id == "c"  # the driver's CPUs all went to instances; c has one left
    assert {b[f"node:{p.host}"] for b, p in zip(plan.bundles[1:], plan.instances)} == {0.001}
    assert describe(plan) == ("4 instance(s) on 2 node(s) (SPREAD; 10.0.0.1: [0, 1], 10.0.0.3: [2, 3]), "
                              "controller on 10.0.0.3, KV over gloo")


def test_explicit_torch_threads_win_over_the_per_node_share():
    plan = plan_placement(serve_cfg(torch_threads=3), [HEAD])
    assert [p.torch_threads for p in plan.instances] == [3, 3]


def test_not_enough_cpus_is_a_clear_error():
    with pytest.raises(ValueError, match=r"4 instances need 4 CPUs \(one each\), but the Ray cluster has 3 on 2"):
        plan_placement(serve_cfg(prefill=2, decode=2), [NodeInfo("a", "1.1.1.1", 1, is_driver=True),
                                                        NodeInfo("b", "1.1.1.2", 2)])


def test_no_cpu_left_for_the_controller_is_a_clear_error():
    with pytest.raises(ValueError, match="no CPU is left for the controller"):
        plan_placement(serve_cfg(), [NodeInfo("a", "1.1.1.1", 2, is_driver=True)])


def test_shm_cannot_span_nodes_but_colocated_instances_can():
    nodes = [NodeInfo("a", "1.1.1.1", 2, is_driver=True), NodeInfo("b", "1.1.1.2", 2)]
    with pytest.raises(ValueError, match="'shm' needs all 3 instances on one node.*--kv-transport gloo"):
        plan_placement(serve_cfg(prefill=1, decode=2, kv_transport="shm"), nodes)
    # Colocated instances never move KV: the transport does not bind them to one node.
    plan = plan_placement(ServeConfig(mode="colocated", shape=ClusterShape(num_instances=3), kv_transport="shm"), nodes)
    assert [p.node_id for p in plan.instances] == ["a", "a", "b"]
    assert plan.controller.node_id == "b"


def test_explicit_gloo_still_packs_when_one_node_holds_everything():
    plan = plan_placement(serve_cfg(kv_transport="gloo"), [HEAD, NodeInfo("w", "10.0.0.2", 64)])
    assert plan.transport == "gloo" and plan.strategy == "PACK" and plan.num_nodes == 1


# ---- plan: GPU clusters ----------------------------------------------------------------------------
def test_gpu_one_node_uses_cuda_ipc_and_one_gpu_per_instance():
    nodes = [HEAD, gpu_node("g8", "10.0.1.1", 8)]
    plan = plan_placement(serve_cfg("cuda", prefill=2, decode=2), nodes)
    assert plan.strategy == "PACK" and plan.transport == "cuda_ipc"
    assert all(p.node_id == "g8" and p.host == "10.0.1.1" for p in plan.instances)
    assert all(p.num_gpus == 1 and p.num_cpus == 1 and p.device == "cuda" for p in plan.instances)
    assert all(p.torch_threads is None for p in plan.instances)
    assert plan.bundles[1] == {"CPU": 1.0, "GPU": 1.0, "node:10.0.1.1": 0.001}
    # The controller stays on the driver's node (the CPU-only head), next to the API process.
    assert plan.controller.node_id == "head" and plan.bundles[0] == {"CPU": 1.0, "node:10.0.0.1": 0.001}
    assert plan.rendezvous_host == "10.0.1.1"


def test_gpu_prefers_the_driver_node_when_it_fits():
    nodes = [gpu_node("w", "10.0.1.2", 8), gpu_node("d", "10.0.1.1", 2, driver=True)]
    plan = plan_placement(serve_cfg("cuda"), nodes)
    assert {p.node_id for p in plan.instances} == {"d"} and plan.controller.node_id == "d"


def test_gpu_spans_nodes_with_nccl_biggest_first():
    nodes = [HEAD, gpu_node("g2", "10.0.1.2", 2), gpu_node("g4", "10.0.1.1", 4)]
    plan = plan_placement(serve_cfg("cuda", prefill=2, decode=3), nodes)
    assert plan.strategy == "SPREAD" and plan.transport == "nccl" and plan.multi_node
    assert [p.node_id for p in plan.instances] == ["g4"] * 4 + ["g2"]
    assert plan.rendezvous_host == "10.0.1.1" and plan.controller.node_id == "head"


def test_gpu_room_is_capped_by_the_node_cpus():
    nodes = [HEAD, gpu_node("g8", "10.0.1.1", 8, cpus=2), gpu_node("g4", "10.0.1.2", 4)]
    plan = plan_placement(serve_cfg("cuda", prefill=2, decode=2), nodes)
    assert {p.node_id for p in plan.instances} == {"g4"}  # g8 has 8 GPUs but CPUs for 2 engine loops


def test_not_enough_gpus_is_a_clear_error():
    nodes = [HEAD, gpu_node("g2", "10.0.1.2", 2), gpu_node("g1", "10.0.1.3", 1)]
    with pytest.raises(ValueError, match=r"4 instances need 4 GPUs \(one each\), but the Ray cluster has 3 on 3"):
        plan_placement(serve_cfg("cuda", prefill=2, decode=2), nodes)


def test_cuda_ipc_needs_one_node():
    nodes = [HEAD, gpu_node("a", "10.0.1.2", 2), gpu_node("b", "10.0.1.3", 2)]
    with pytest.raises(ValueError, match="'cuda_ipc' needs all 3 instances on one node.*biggest Ray node has room "
                                         "for 2.*--kv-transport nccl"):
        plan_placement(serve_cfg("cuda", prefill=1, decode=2, kv_transport="cuda_ipc"), nodes)
    assert plan_placement(serve_cfg("cuda", prefill=1, decode=2, kv_transport="nccl"), nodes).transport == "nccl"


@pytest.mark.parametrize("transport", ["nccl", "cuda_ipc"])
def test_gpu_transports_on_cpu_are_rejected(transport):
    with pytest.raises(ValueError, match=f"kv_transport '{transport}' moves KV between GPUs"):
        plan_placement(serve_cfg(kv_transport=transport), [HEAD])


@pytest.mark.parametrize("device, hint", [("cuda:1", "use --device cuda"), ("mps", "use cpu or cuda")])
def test_devices_the_ray_launcher_cannot_place(device, hint):
    with pytest.raises(ValueError, match=hint):
        plan_placement(serve_cfg(device), [HEAD])


def test_empty_cluster():
    with pytest.raises(ValueError, match="no alive node"):
        plan_placement(serve_cfg(), [])


# ---- addresses, instance configs, pids, GPU visibility ---------------------------------------------
def test_reachable_address():
    assert reachable_address("tcp://0.0.0.0:5555", "10.0.0.1") == "tcp://10.0.0.1:5555"
    assert reachable_address("tcp://10.0.0.7:5555", "10.0.0.1") == "tcp://10.0.0.7:5555"
    with pytest.raises(ValueError, match="no port"):
        reachable_address("tcp://0.0.0.0", "10.0.0.1")
    with pytest.raises(ValueError, match="not a ZeroMQ tcp address"):
        reachable_address("0.0.0.0:1", "10.0.0.1")


def test_instance_configs_carry_each_node_host_and_the_plan_transport():
    nodes = [NodeInfo("a", "10.0.0.1", 2, is_driver=True), NodeInfo("b", "10.0.0.2", 4)]
    cfg = serve_cfg(prefill=2, decode=2)
    plan = plan_placement(cfg, nodes)
    configs = instance_configs(cfg, plan, api_address="tcp://10.0.0.1:1", controller_address="tcp://10.0.0.2:2",
                               kv_init_method="tcp://10.0.0.2:3")
    assert [c.role for c in configs] == [PREFILL, PREFILL, DECODE, DECODE]
    assert [c.host for c in configs] == [p.host for p in plan.instances] == ["10.0.0.2"] * 4
    assert {c.kv_transport for c in configs} == {plan.transport} == {"shm"}
    assert [c.torch_threads for c in configs] == [1, 1, 1, 1]
    assert all(c.world_size == 4 and c.kv_init_method == "tcp://10.0.0.2:3" for c in configs)
    assert all(c.controller_address == "tcp://10.0.0.2:2" and c.engine.device == "cpu" for c in configs)

    spread = plan_placement(serve_cfg(prefill=2, decode=3), nodes)
    configs = instance_configs(serve_cfg(prefill=2, decode=3), spread, api_address="a", controller_address="c",
                               kv_init_method="k")
    assert [c.host for c in configs] == ["10.0.0.1"] * 2 + ["10.0.0.2"] * 3  # the driver's node first
    assert {c.kv_transport for c in configs} == {"gloo"}
    colocated = ServeConfig(mode="colocated", shape=ClusterShape(num_instances=2))
    configs = instance_configs(colocated, plan_placement(colocated, nodes), api_address="a", controller_address="c",
                               kv_init_method="k")
    assert [c.role for c in configs] == [COLOCATED, COLOCATED]


def test_remote_instances_are_those_off_the_controller_node():
    nodes = [gpu_node("a", "10.0.0.1", 2, driver=True), gpu_node("b", "10.0.0.2", 2)]
    plan = plan_placement(serve_cfg("cuda", prefill=2, decode=2), nodes)
    assert plan.controller.node_id == "a"
    assert remote_instances(plan) == {2, 3}  # b's instances: a pid probe on a means nothing
    single = plan_placement(serve_cfg("cuda"), nodes)
    assert remote_instances(single) == frozenset()


def test_assigned_devices_share_the_node_gpus_by_position():
    got = assigned_devices(["n1", "n1", "n2", "n1"], [["3"], ["10"], ["0"], ["2"]])
    assert got == [("2,3,10", "cuda:1"), ("2,3,10", "cuda:2"), ("0", "cuda:0"), ("2,3,10", "cuda:0")]
    with pytest.raises(ValueError, match=r"exactly 1 GPU\(s\)"):
        assigned_devices(["n1"], [["0", "1"]])


def test_assigned_devices_keep_each_tensor_parallel_instance_on_adjacent_positions():
    # Ray hands out GPU ids in any order; each instance's ranks must be device, device+1.
    got = assigned_devices(["n1", "n1", "n2"], [["5", "1"], ["0", "4"], ["7", "6"]], tp=2)
    assert got == [("0,4,1,5", "cuda:2"), ("0,4,1,5", "cuda:0"), ("6,7", "cuda:0")]
    with pytest.raises(ValueError, match=r"exactly 2 GPU\(s\)"):
        assigned_devices(["n1"], [["0"]], tp=2)


def test_gpu_plan_gives_each_instance_its_tensor_parallel_gpus():
    nodes = [HEAD, gpu_node("g4", "10.0.1.1", 4), gpu_node("g8", "10.0.1.2", 8)]
    cfg = ServeConfig(shape=ClusterShape(1, 2), engine=EngineConfig(device="cuda", tensor_parallel_size=2))
    plan = plan_placement(cfg, nodes)
    assert all(p.num_gpus == 2 and p.node_id == "g8" for p in plan.instances)  # 3 x 2 GPUs fit g8 alone
    assert plan.bundles[1]["GPU"] == 2.0
    cfg = ServeConfig(shape=ClusterShape(2, 2), engine=EngineConfig(device="cuda", tensor_parallel_size=4))
    with pytest.raises(ValueError, match=r"4 instances need 16 GPUs \(tensor_parallel_size 4 each\), but the Ray "
                                         r"cluster has 12"):
        plan_placement(cfg, nodes)


# ---- without Ray -----------------------------------------------------------------------------------
def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'tetriinfer\[ray\]'") as e:
        start_ray(serve_cfg(), "tcp://0.0.0.0:1", None)
    assert str(e.value) == RAY_MISSING


def test_unreachable_cluster_is_a_clear_error(monkeypatch):
    class UnreachableRay(types.ModuleType):
        def is_initialized(self):
            return False

        def init(self, address=None, runtime_env=None):
            raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

    monkeypatch.setitem(sys.modules, "ray", UnreachableRay("ray"))
    with pytest.raises(ValueError, match="cannot join the Ray cluster at 10.9.9.9:6379: Failed to connect.*"
                                         "RAY_AUTH_MODE=token"):
        start_ray(serve_cfg(), "tcp://0.0.0.0:1", "10.9.9.9:6379")


def test_ray_client_addresses_are_rejected():
    with pytest.raises(ValueError, match="ray://"):
        start_ray(serve_cfg(), "tcp://0.0.0.0:1", "ray://head:10001")


# ---- with Ray --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    """A 4-CPU Ray on this machine, on loopback only; its address for other processes."""
    saved = dict(os.environ)
    # Read when ray is imported: Ray then takes 127.0.0.1 as the node address, so all its traffic
    # (and ours) stays on loopback. The serve process inherits it.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = pytest.importorskip("ray")
    # Ray's workers start in their own folder; the package must import there (editable or not).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    ctx = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray, ctx.address_info["address"]
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)  # ray.init also set its auth mode here


@pytest.mark.slow
def test_alive_sees_a_crashed_actor_at_once_and_stop_kills_the_rest(local_ray, monkeypatch):
    ray, _ = local_ray
    actor = ray.remote(ProcessActor)
    sleeper, crasher, controller = (actor.options(num_cpus=0).remote() for _ in range(3))
    runs = [sleeper.run.remote(time.sleep, 60), crasher.run.remote(sys.exit, 3)]
    cluster = RayCluster("tcp://x:1", controller, [sleeper, crasher], controller.run.remote(time.sleep, 60),
                         runs, None, plan=None, owns_ray=False)
    wait_until(lambda: cluster.alive() == [0], 20, "alive() to drop the crashed instance", interval_s=0.05)
    assert cluster.alive() == [0] and cluster.controller_alive()
    with pytest.raises(ray.exceptions.RayActorError):  # the process ended, not just the method
        ray.get(crasher.pid.remote(), timeout=20)
    # Polled every 0.2 s while starting, so it must be cheap: one local ray.wait over all the runs
    # that neither blocks (timeout 0) nor pulls results to this node, however the actors fare.
    real_wait, waits = ray.wait, []

    def spy_wait(refs, **kwargs):
        waits.append((list(refs), kwargs))
        return real_wait(refs, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ray, "wait", spy_wait)
        assert cluster.alive() == [0]
        assert [refs for refs, _ in waits] == [runs]  # one call for all instances, not one per actor
        assert cluster.controller_alive()
    assert all(kw.get("timeout") == 0 and kw.get("fetch_local") is False for _, kw in waits), waits
    cluster.stop(timeout_s=0.5)
    wait_until(lambda: not (cluster.alive() or cluster.controller_alive()), 20, "stop() to end every actor",
               interval_s=0.05)
    assert cluster.alive() == [] and not cluster.controller_alive()


@pytest.mark.slow
def test_serve_on_ray_completes_a_request(local_ray, tmp_path):
    ray, address = local_ray
    with start_server(["--launcher", "ray", "--ray-address", address, "--prefill-instances", "1",
                       "--decode-instances", "1", "--num-blocks", "128", "--torch-threads", "1"], tmp_path) as server:
        # The placement (its exact wording is describe()'s test): both instances on this node, KV over shm.
        placement = next((line for line in server.log().splitlines() if "instance(s) on" in line), "")
        for fact in ("2 instance(s)", "1 node(s)", "PACK", "127.0.0.1: [0, 1]", "shm"):
            assert fact in placement, f"{fact!r} not in the placement log line {placement!r}"
        body = {"model": "tiny", "prompt": "Hello, Ray", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, f"{response.text}\n--- server log ---\n{server.log()[-4000:]}"
        out = response.json()
    wait_until(lambda: ray.available_resources().get("CPU") == 4.0, 20,
               "the actors and the placement group to release their CPUs")
    expected = LLM("tiny").generate(["Hello, Ray"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["text"] == expected[0].outputs[0].text  # prefill and decode on Ray actors
