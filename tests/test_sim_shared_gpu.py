"""Instances sharing one GPU, time-sliced (`ClusterConfig.instances_per_gpu`): one forward step at a
time per GPU, handed over in FIFO order; every request still finishes once; one instance per GPU is
exactly the unshared run; and serve_bench derives the sharing from where `serve` puts instances."""

import json
from pathlib import Path

import pytest

from script_utils import load_script
from tetriinfer.bench.workload import RequestSpec, build_specs
from tetriinfer.config import ClusterConfig, ClusterShape, SimConfig
from tetriinfer.sim.cluster import ClusterSim
from tetriinfer.sim.cost import RooflineCostModel
from tetriinfer.sim.gpu import SharedGpu
from tetriinfer.sim.length_oracle import OracleLengthPredictor

ROOT = Path(__file__).resolve().parents[1]
COST = RooflineCostModel.from_names("h100", "llama3-8b")
SYSTEMS = ("tetriinfer", "disagg", "vllm", "sarathi")


def config(system: str, sharing: int, prefill: int = 1, decode: int = 1) -> SimConfig:
    return SimConfig(ClusterConfig(system=system, shape=ClusterShape(prefill, decode, prefill + decode),
                                   instances_per_gpu=sharing))


def new_sim(cfg: SimConfig) -> ClusterSim:
    p = cfg.policy
    predictor = OracleLengthPredictor(p.predictor_accuracy, p.bucket_size, seed=cfg.seed)
    return ClusterSim(cfg, COST, predictor if cfg.cluster.system == "tetriinfer" else None)


def run(system: str, specs, sharing: int, prefill: int = 1, decode: int = 1):
    """The run, plus every step as (instance id, start, end)."""
    sim = new_sim(config(system, sharing, prefill, decode))
    steps = []
    for inst in sim.instances.values():
        def start_step(now, inst=inst, start=inst.start_step):
            duration = start(now)
            if duration is not None:
                steps.append((inst.instance_id, now, now + duration))
            return duration
        inst.start_step = start_step
    return sim, sim.run(specs), steps


def times(result) -> list:
    return [(r.request_id, r.first_token_s, r.finish_s) for r in result.requests]


def mean_jct(result) -> float:
    return sum(r.finish_s - r.arrival_s for r in result.requests) / len(result.requests)


@pytest.mark.parametrize("system", SYSTEMS)
def test_instances_sharing_a_gpu_never_step_at_the_same_time(system):
    specs = build_specs("mixed", 96, rate=20.0, seed=1, max_total_tokens=8192)
    _, _, steps = run(system, specs, sharing=2, prefill=2, decode=2)
    for gpu in (0, 1):
        mine = sorted((start, end) for i, start, end in steps if i // 2 == gpu)
        assert len(mine) > 10
        assert all(nxt[0] >= prev[1] for prev, nxt in zip(mine, mine[1:]))
    # GPUs 0 and 1 do run at once: sharing is per GPU, not cluster-wide.
    a = [(s, e) for i, s, e in steps if i // 2 == 0]
    b = [(s, e) for i, s, e in steps if i // 2 == 1]
    assert any(s0 < e1 and s1 < e0 for s0, e0 in a[:50] for s1, e1 in b[:50])


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("workload", ("lphd", "hpld", "conversation"))
def test_every_request_finishes_exactly_once_when_instances_share_a_gpu(system, workload):
    specs = build_specs(workload, 80, rate=16.0, seed=2, max_total_tokens=8192)
    sim, result, _ = run(system, specs, sharing=3, prefill=1, decode=2)
    assert sorted(r.request_id for r in result.requests) == sorted(s.request_id for s in specs)
    for r in result.requests:  # a second finish raises inside the run
        assert r.arrival_s <= r.prefill_start_s <= r.first_token_s <= r.finish_s
    for inst in sim.instances.values():
        assert inst.is_empty() and inst.batch.used_blocks == 0
    assert all(not gpu.waiting and gpu.holder is None for gpu in sim.gpu_of)
    assert len({id(gpu) for gpu in sim.gpu_of}) == 1  # 3 instances, 3 per GPU


@pytest.mark.parametrize("system", SYSTEMS)
def test_one_busy_instance_at_a_time_runs_as_fast_as_on_its_own_gpu(system):
    # Requests far apart: each is done before the next arrives, so nobody ever waits for the GPU.
    specs = [RequestSpec(i, 30.0 * i, 200 + 50 * i, 40 + 10 * i) for i in range(6)]
    assert times(run(system, specs, sharing=2)[1]) == times(run(system, specs, sharing=1)[1])


@pytest.mark.parametrize("system", SYSTEMS)
def test_sharing_a_gpu_under_load_never_lowers_mean_jct(system):
    specs = build_specs("mixed", 128, rate=12.0, seed=3, max_total_tokens=8192)
    shared, unshared = run(system, specs, sharing=2)[1], run(system, specs, sharing=1)[1]
    assert mean_jct(shared) > mean_jct(unshared)


def test_the_gpu_alternates_between_instances_that_both_have_work():
    specs = build_specs("lphd", 64, seed=4, max_total_tokens=8192)  # a closed batch: both instances busy from t=0
    _, _, steps = run("sarathi", specs, sharing=2)
    owners = [i for i, _, _ in sorted(steps, key=lambda s: s[1])][:40]
    assert owners == [owners[0], 1 - owners[0]] * 20


def test_a_waiting_instance_is_never_overtaken():
    gpu = SharedGpu()
    assert gpu.try_start(0)
    gpu.holder = 0
    assert not gpu.try_start(1) and not gpu.try_start(2) and not gpu.try_start(1)
    assert list(gpu.waiting) == [1, 2]  # queued once each, in order
    gpu.holder = None
    assert not gpu.try_start(0)  # idle, but others queued first
    assert gpu.take_waiting() == [1, 2, 0] and gpu.try_start(1)


@pytest.mark.parametrize("system", SYSTEMS)
def test_one_instance_per_gpu_is_the_default_and_more_sharing_than_instances_is_harmless(system):
    specs = build_specs("mixed", 64, rate=8.0, seed=5, max_total_tokens=8192)
    default = new_sim(SimConfig(ClusterConfig(system=system, shape=ClusterShape(1, 1, 2))))
    assert ClusterConfig().instances_per_gpu == 1
    assert times(default.run(specs)) == times(run(system, specs, sharing=1)[1])
    # All instances on one GPU however large the number.
    assert times(run(system, specs, sharing=2)[1]) == times(run(system, specs, sharing=8)[1])


@pytest.mark.parametrize("bad", (0, -1))
def test_instances_per_gpu_below_one_is_rejected(bad):
    with pytest.raises(ValueError, match="instances_per_gpu must be >= 1"):
        ClusterConfig(instances_per_gpu=bad)


def test_serve_bench_simulates_instances_where_serve_puts_them():
    sb = load_script("serve_bench")
    shared = sb.serve_config(["--mode", "colocated", "--instances", "2", "--baseline", "sarathi", "--device", "cuda:0"])
    one_gpu_split = sb.serve_config(["--prefill-instances", "1", "--decode-instances", "2", "--device", "cuda:1"])
    own_gpus = sb.serve_config(["--prefill-instances", "1", "--decode-instances", "1", "--device", "cuda"])
    on_cpu = sb.serve_config(["--mode", "colocated", "--instances", "2", "--device", "cpu"])
    assert [sb.sim_config(c).cluster.instances_per_gpu for c in (shared, one_gpu_split, own_gpus, on_cpu)] == [2, 3, 1, 1]
    assert sb.sim_config(shared, gpu_sharing=1).cluster.instances_per_gpu == 1


def test_serve_bench_resim_rewrites_the_sim_of_a_saved_result(tmp_path):
    sb = load_script("serve_bench")
    flags = ["--mode", "colocated", "--instances", "2", "--baseline", "sarathi", "--device", "cuda:0"]
    saved = {"commit": "x", "device": "GPU", "args": {"workloads": "lpld", "arrivals": "4", "runs": None,
                                                       "num_requests": 24, "max_model_len": 8192,
                                                       "profile": str(ROOT / "docs/benchmarks/profile-h200-llama3-8b.json")},
             "systems": {"s": {"flags": flags, "runs": {"lpld/4": {"sim": {"old": True}}}}, "broken": {"error": "x"}}}
    path = tmp_path / "serve-bench.json"
    path.write_text(json.dumps(saved))
    shared = sb.resim(str(path), None, None)["systems"]["s"]["runs"]["lpld/4"]
    unshared = sb.resim(str(path), None, 1)["systems"]["s"]["runs"]["lpld/4"]
    assert shared["sim_before_resim"] == {"old": True} and shared["sim"]["num_requests"] == 24
    assert shared["sim"]["jct"]["mean"] > unshared["sim"]["jct"]["mean"]
