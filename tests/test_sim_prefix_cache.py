"""Prefix caching in the simulator (sim.prefix_cache): hits skip their cached prompt tokens, the
cache is bounded, cache-aware routing keeps conversations where their KV is, and nothing leaks."""

import dataclasses

import pytest

from tetriinfer.bench.workload import RequestSpec, make_workload
from tetriinfer.config import ClusterConfig, ClusterShape, PolicyConfig, SimConfig
from tetriinfer.sim.cluster import ClusterSim
from tetriinfer.sim.length_oracle import OracleLengthPredictor
from test_sim_cluster import SmallGpu, assert_conserved

SYSTEMS = ("tetriinfer", "tetriinfer-paper", "sarathi", "vllm")


def sim_config(system, *, fraction=1.0, aware=True, instances=2):
    policy = {"cache_aware_routing": aware}
    if system == "tetriinfer-paper":
        system, policy = "tetriinfer", {**policy, "disagg_policy": "paper"}
    prefill = max(1, instances // 2)
    cluster = ClusterConfig(system=system, shape=ClusterShape(prefill, max(1, instances - prefill), instances))
    return SimConfig(cluster, PolicyConfig(**policy), prefix_cache_fraction=fraction)


def run(system, specs, kv_tokens=400_000, **kwargs):
    cfg = sim_config(system, **kwargs)
    predictor = OracleLengthPredictor(cfg.policy.predictor_accuracy, cfg.policy.bucket_size, seed=0)
    sim = ClusterSim(cfg, SmallGpu(kv_tokens), predictor)
    sim.run(specs)
    assert_conserved(sim, specs)
    return sim.result


def by_id(result):
    return {r.request_id: r for r in result.requests}


@pytest.mark.parametrize("system", SYSTEMS)
def test_a_repeated_prompt_prefills_only_past_its_cached_blocks(system):
    ids = (1, 2, 3, 4)
    specs = [RequestSpec(0, 0.0, 2000, 20, ids), RequestSpec(1, 5.0, 2000, 20, ids),
             RequestSpec(2, 10.0, 2048, 20, ids)]
    result = run(system, specs, instances=1 if system in ("sarathi", "vllm") else 2)
    reqs = by_id(result)
    assert reqs[0].cached_tokens == 0
    assert reqs[1].cached_tokens == 3 * 512  # 2000 tokens: 3 full blocks; the partial 4th is never cached
    assert reqs[2].cached_tokens == 3 * 512  # 2048 = 4 full blocks, but never the last token... and only 3 held
    ttft = {i: r.first_token_s - r.arrival_s for i, r in reqs.items()}
    assert ttft[1] < ttft[0]
    # Conservation: the counters are the requests' own.
    assert result.prefix_hit_tokens == sum(r.cached_tokens for r in result.requests)
    assert result.prefix_queried_tokens == 2000 + 2000 + 2048


def test_a_fully_cached_prompt_still_computes_its_last_token():
    specs = [RequestSpec(0, 0.0, 1024, 5, (7, 8)), RequestSpec(1, 5.0, 1024, 5, (7, 8))]
    assert by_id(run("sarathi", specs, instances=1))[1].cached_tokens == 1023


def test_a_kv_move_skips_the_prompt_blocks_the_decode_instance_holds():
    """The second turn's KV move sends only what the decode instance lacks: it decoded the first
    turn and cached its three full prompt blocks (the paper's split moves every request)."""
    ids = (1, 2, 3, 4)
    specs = [RequestSpec(0, 0.0, 2000, 20, ids), RequestSpec(1, 5.0, 2000, 20, ids)]
    on = run("tetriinfer-paper", specs, instances=2)
    off = run("tetriinfer-paper", specs, instances=2, fraction=0.0)
    assert on.kv_skipped_tokens == 3 * 512
    assert off.kv_skipped_tokens == 0
    decode_span = {name: by_id(result)[1].finish_s - by_id(result)[1].first_token_s
                   for name, result in (("on", on), ("off", off))}
    gpu = SmallGpu(0)
    saved = gpu.transfer_time(2000 * 1000) - gpu.transfer_time((2000 - 3 * 512) * 1000)
    assert decode_span["off"] - decode_span["on"] == pytest.approx(saved, rel=1e-6)


def test_caching_off_or_no_hash_ids_simulates_exactly_as_before():
    specs = make_workload("conversation", 120, arrival="poisson", rate=4.0, seed=1)
    plain = [dataclasses.replace(s, hash_ids=None) for s in specs]
    for system in SYSTEMS:
        base = [(r.first_token_s, r.finish_s) for r in run(system, plain).requests]
        off = run(system, specs, fraction=0.0)
        assert [(r.first_token_s, r.finish_s) for r in off.requests] == base
        assert off.prefix_queried_tokens == off.prefix_hit_tokens == 0


def test_a_smaller_cache_evicts_and_hits_less():
    specs = make_workload("conversation", 300, arrival="poisson", rate=6.0, seed=2)
    full = run("sarathi", specs, kv_tokens=200_000)
    small = run("sarathi", specs, kv_tokens=200_000, fraction=0.02)  # 4,000 tokens: 7 blocks per instance
    assert full.prefix_hit_rate > 0.2
    assert small.prefix_hit_rate < full.prefix_hit_rate / 2
    assert small.prefix_evicted_blocks > 0 and full.prefix_evicted_blocks == 0


@pytest.mark.parametrize("system", ("sarathi", "tetriinfer-paper", "tetriinfer"))
def test_cache_aware_routing_keeps_conversations_where_their_prefix_is(system):
    specs = make_workload("conversation", 300, arrival="poisson", rate=6.0, seed=3)
    aware = run(system, specs, instances=4)
    blind = run(system, specs, instances=4, aware=False)
    # Blind, ties go to the first instance, so at light load it keeps some locality by chance.
    assert aware.prefix_hit_rate > blind.prefix_hit_rate + 0.05
    assert aware.prefix_hit_tokens > blind.prefix_hit_tokens
