"""Instances sharing one GPU under MPS (`ClusterConfig.gpu_sharing="mps"`, sim/gpu.py): steps run
side by side, each slowed by its SM share and what its neighbours run; one instance per GPU is the
unshared run bit for bit; every request finishes once, no KV block leaks, runs repeat exactly;
serve_bench simulates `serve --mps-sm-shares` runs this way."""

from pathlib import Path

import pytest

from script_utils import load_script
from tetriinfer.bench.workload import build_specs
from tetriinfer.config import ClusterConfig, ClusterShape, FlipConfig, SimConfig
from tetriinfer.sim.cluster import ClusterSim
from tetriinfer.sim.cost import RooflineCostModel, TableCostModel
from tetriinfer.sim.gpu import MPS, MpsGpu, MpsStep, SharedGpu, mps_slowdown
from tetriinfer.sim.length_oracle import OracleLengthPredictor

ROOT = Path(__file__).resolve().parents[1]
ROOFLINE = RooflineCostModel.from_names("h100", "llama3-8b")
H200 = TableCostModel.from_file(ROOT / "docs/benchmarks/profile-h200-llama3-8b.json")
SYSTEMS = ("tetriinfer", "disagg", "vllm", "sarathi")


def new_sim(system: str, sharing: int, mode: str = "mps", prefill: int = 1, decode: int = 1, cost=ROOFLINE,
            flip: bool = False) -> ClusterSim:
    cluster = ClusterConfig(system=system, shape=ClusterShape(prefill, decode, prefill + decode),
                            instances_per_gpu=sharing, gpu_sharing=mode)
    cfg = SimConfig(cluster, flip=FlipConfig(enabled=flip))
    p = cfg.policy
    predictor = OracleLengthPredictor(p.predictor_accuracy, p.bucket_size, seed=cfg.seed)
    return ClusterSim(cfg, cost, predictor if system == "tetriinfer" else None)


def run(system: str, specs, sharing: int, **kwargs):
    sim = new_sim(system, sharing, **kwargs)
    return sim, sim.run(specs)


def times(result) -> list:
    return [(r.request_id, r.first_token_s, r.finish_s) for r in result.requests]


def mean_jct(result) -> float:
    return sum(r.finish_s - r.arrival_s for r in result.requests) / len(result.requests)


def mean_tpot(result) -> float:
    return result.summary().tpot.mean


# --- the model ----------------------------------------------------------------------------------

def test_a_step_alone_is_slowed_only_by_its_compute_share():
    decode, prefill = MpsStep(0.008, 0.0, 0.6), MpsStep(0.05, 1.0, 0.4)
    assert mps_slowdown(decode, []) == 1.0  # memory-bound: its own share does not matter
    assert mps_slowdown(MpsStep(0.05, 1.0, 1.0), []) == 1.0
    assert mps_slowdown(prefill, []) == pytest.approx(2.5)  # 40% of the SMs: 40% of the throughput


def test_the_calibration_reproduces_the_micro_benchmark():
    decode, prefill = MpsStep(0.008, 0.0, 1.0), MpsStep(0.05, 1.0, 0.4)
    assert mps_slowdown(decode, [prefill]) == pytest.approx(1.3)  # decode beside a 40%-capped prefill
    assert 1.0 / mps_slowdown(prefill, [decode]) == pytest.approx(0.35)  # that prefill's throughput
    assert mps_slowdown(decode, [MpsStep(0.05, 1.0, 1.0)]) == pytest.approx(6.8)  # uncapped MPS
    assert MPS.memory_slowdown_beside_compute(0.0) == 1.0


def test_oversubscribed_shares_split_the_sms():
    a, b = MpsStep(0.05, 1.0, 1.0), MpsStep(0.05, 1.0, 1.0)
    assert mps_slowdown(a, [b]) == pytest.approx(2.0 * MPS.compute_beside_work)


def _pair(gpu, decode_s: float, prefill_s: float) -> dict[int, float]:
    """A decode step on instance 1 and a prefill step on instance 0 started together: their ends."""
    events = gpu.start(0, 0.0, prefill_s, 0, 0) + gpu.start(1, 0.0, decode_s, 64, 64 * 1024)
    ends = {}
    while events:
        events.sort()
        now, i = events.pop(0)
        moved = gpu.end(i, now)
        if moved is None:
            continue  # stale
        ends[i] = now
        events += moved
    return ends


@pytest.mark.parametrize("cost", (ROOFLINE, H200))
def test_a_decode_step_beside_a_prefill_is_slower_than_alone_and_faster_than_time_sliced(cost):
    decode_s, prefill_s = cost.step_time(0, 0, 64, 64 * 1024), cost.step_time(2048, 0, 0, 0)
    ends = _pair(MpsGpu({0: 0.4, 1: 0.6}, cost), decode_s, prefill_s)
    assert decode_s < ends[1] < prefill_s + decode_s  # time-sliced, it waits behind the chunk
    assert ends[1] == pytest.approx(decode_s * 1.3, rel=0.05)  # almost all of it beside compute
    assert ends[0] > 2 * prefill_s  # the prefill has 40% of the SMs (its weight streaming aside)
    sliced = SharedGpu()
    assert sliced.start(0, 0.0, prefill_s) == [(prefill_s, 0)]


def test_a_step_end_moved_by_a_neighbour_is_stale():
    gpu = MpsGpu({0: 0.4, 1: 0.6}, ROOFLINE)
    [(first_end, _)] = gpu.start(1, 0.0, 0.01, 8, 8 * 512)
    moved = gpu.start(0, 0.002, 0.05, 0, 0)
    later = dict((i, t) for t, i in moved)[1]
    assert later > first_end and gpu.end(1, first_end) is None
    assert gpu.end(1, later) is not None and list(gpu.running) == [0]


# --- whole runs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("system", SYSTEMS)
def test_mps_with_one_instance_per_gpu_is_the_unshared_run(system):
    specs = build_specs("mixed", 64, rate=8.0, seed=5, max_total_tokens=8192)
    unshared, mps = run(system, specs, 1, mode="time-slice")[1], run(system, specs, 1)[1]
    assert times(mps) == times(unshared) and mps.summary() == unshared.summary()
    assert mps.num_events == unshared.num_events


@pytest.mark.parametrize("system", ("tetriinfer", "sarathi", "vllm"))
@pytest.mark.parametrize("cost", (ROOFLINE, H200))
def test_two_instances_under_mps_sit_between_unshared_and_time_sliced(system, cost):
    specs = build_specs("mixed", 100, rate=6.0, seed=3, max_total_tokens=8192)
    unshared, mps, sliced = (run(system, specs, n, mode=m, cost=cost)[1]
                             for n, m in ((1, "time-slice"), (2, "mps"), (2, "time-slice")))
    assert mean_jct(unshared) < mean_jct(mps) < mean_jct(sliced)
    assert mean_tpot(unshared) < mean_tpot(mps) < mean_tpot(sliced)


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("workload", ("lphd", "hpld", "conversation"))
def test_every_request_finishes_once_and_no_kv_leaks_under_mps(system, workload):
    specs = build_specs(workload, 80, rate=16.0, seed=2, max_total_tokens=8192)
    sim, result = run(system, specs, 3, prefill=1, decode=2, flip=system == "tetriinfer")
    assert sorted(r.request_id for r in result.requests) == sorted(s.request_id for s in specs)
    for r in result.requests:  # a second finish raises inside the run
        assert r.arrival_s <= r.prefill_start_s <= r.first_token_s <= r.finish_s
    for inst in sim.instances.values():
        assert inst.is_empty() and inst.batch.used_blocks == 0 and inst.prefill_blocks == 0
    assert len({id(gpu) for gpu in sim.gpu_of}) == 1 and not sim.gpu_of[0].running


@pytest.mark.parametrize("system", SYSTEMS)
def test_mps_runs_repeat_exactly(system):
    specs = build_specs("mixed", 96, rate=10.0, seed=6, max_total_tokens=8192)
    first, second = (run(system, specs, 2, prefill=2, decode=2)[1] for _ in range(2))
    assert times(first) == times(second) and first.num_events == second.num_events


def test_instances_on_one_gpu_step_side_by_side_under_mps():
    specs = build_specs("lphd", 64, seed=4, max_total_tokens=8192)  # a closed batch: both busy from t=0
    sim = new_sim("sarathi", 2)
    gpu, together = sim.gpu_of[0], []
    start = gpu.start

    def traced(*args):
        events = start(*args)
        together.append(len(gpu.running))
        return events
    gpu.start = traced
    sim.run(specs)
    assert together.count(2) > len(together) // 2  # mostly both mid-step at once
    assert not gpu.waiting and not gpu.running


def test_gpu_sharing_knobs_are_checked():
    assert ClusterConfig().gpu_sharing == "time-slice" and ClusterConfig().mps_sm_shares == (40, 60)
    with pytest.raises(ValueError, match="gpu_sharing"):
        ClusterConfig(gpu_sharing="green")
    with pytest.raises(ValueError, match="mps_sm_shares"):
        ClusterConfig(mps_sm_shares=(0, 60))
    assert ClusterConfig(mps_sm_shares=(30, 70)).mps_share("prefill") == 0.3
    assert ClusterConfig().mps_share("colocated") == 1.0


def test_simulate_cli_takes_the_sharing():
    from tetriinfer.bench.simulate import build_config
    from tetriinfer.cli import build_parser

    args = build_parser().parse_args(["simulate", "--instances-per-gpu", "2", "--gpu-sharing", "mps",
                                      "--mps-sm-shares", "35,65"])
    cluster = build_config(args, "tetriinfer").cluster
    assert (cluster.gpu_sharing, cluster.mps_sm_shares) == ("mps", (35, 65))
    default = build_config(build_parser().parse_args(["simulate"]), "tetriinfer").cluster
    assert default.gpu_sharing == "time-slice"


def test_serve_bench_simulates_mps_runs_under_mps():
    sb = load_script("serve_bench")
    mps = sb.serve_config(["--prefill-instances", "1", "--decode-instances", "1", "--device", "cuda:0",
                           "--mps-sm-shares", "30,70"])
    sliced = sb.serve_config(["--prefill-instances", "1", "--decode-instances", "1", "--device", "cuda:0"])
    cluster = sb.sim_config(mps).cluster
    assert (cluster.gpu_sharing, cluster.mps_sm_shares, cluster.instances_per_gpu) == ("mps", (30, 70), 2)
    assert sb.sim_config(sliced).cluster.gpu_sharing == "time-slice"
    assert sb.sim_config(mps, sharing_mode="time-slice").cluster.gpu_sharing == "time-slice"
