"""Metrics: latency statistics, resource time, perf/$, SLO goodput, the table and the plot."""

import math

import pytest

from tetriinfer.bench.report import format_table, plot_distributions
from tetriinfer.metrics import LatencyStats, RequestRecord, perf_per_dollar, summarize


def record(i, arrival, first, finish, output_tokens=11, prompt_tokens=100):
    return RequestRecord(i, arrival, first, finish, prompt_tokens, output_tokens)


@pytest.fixture
def records():
    # TTFTs 0.1 .. 1.0 s, TPOT (finish - first) / 10 = 0.05 .. 0.5 s, arrivals from t=10.
    return [record(i, 10.0 + i, 10.0 + i + 0.1 * (i + 1), 10.0 + i + 0.1 * (i + 1) + 0.5 * (i + 1)) for i in range(10)]


def test_per_request_latencies():
    r = record(0, 1.0, 1.5, 4.5, output_tokens=7)
    assert (r.ttft_s, r.jct_s, r.tpot_s) == (0.5, 3.5, 0.5)
    assert record(1, 0.0, 1.0, 1.0, output_tokens=1).tpot_s is None


def test_latency_stats():
    stats = LatencyStats.of(list(range(101)))
    assert (stats.mean, stats.p50, stats.p90, stats.p99) == (50.0, 50.0, 90.0, 99.0)
    assert math.isnan(LatencyStats.of([]).mean)


def test_summary(records):
    s = summarize(records, {"prefill-0": 25.0, "decode-0": 22.0, "idle": 3.0})
    assert s.num_requests == 10 and s.start_s == 10.0
    assert s.makespan_s == pytest.approx(9 + 1.0 + 5.0)  # the last finishes at 19 + 1 + 5
    assert s.ttft.mean == pytest.approx(0.55) and s.ttft.p50 == pytest.approx(0.55)
    assert s.tpot.mean == pytest.approx(0.275)
    assert s.jct.p99 == pytest.approx(5.4 + 0.91 * 0.6)  # JCTs 0.6 .. 6.0, linear percentile
    assert s.throughput_rps == pytest.approx(10 / 15)
    assert s.output_tokens_per_s == pytest.approx(110 / 15)
    # resource time: 15 s + 12 s, and an instance whose last work precedes the start adds nothing
    assert s.resource_time_s == pytest.approx(27.0)
    assert s.requests_per_resource_s == pytest.approx(10 / 27)
    assert s.goodput_rps is None and s.slo_attainment is None


def test_explicit_start_counts_idle_lead_time(records):
    s = summarize(records, {"a": 25.0}, start_s=0.0)
    assert s.resource_time_s == 25.0 and s.makespan_s == 25.0


def test_goodput_needs_both_slos(records):
    # TTFT <= 0.5 s: requests 0-4; TPOT <= 0.2 s: requests 0-3.
    assert summarize(records, {}, ttft_slo_s=0.5).slo_attainment == 0.5
    assert summarize(records, {}, tpot_slo_s=0.2).slo_attainment == 0.4
    both = summarize(records, {}, ttft_slo_s=0.5, tpot_slo_s=0.2)
    assert both.slo_attainment == 0.4
    assert both.goodput_rps == pytest.approx(4 / 15)
    one_token = [record(0, 0.0, 0.1, 0.1, output_tokens=1)]
    assert summarize(one_token, {}, tpot_slo_s=0.001).slo_attainment == 1.0  # no later tokens to be late


def test_perf_per_dollar_is_requests_per_resource_second_over_the_baseline(records):
    baseline = summarize(records, {"vllm": 30.0})  # 20 resource-seconds
    ours = summarize(records, {"p": 15.0, "d": 20.0})  # 5 + 10 = 15 resource-seconds
    assert perf_per_dollar(ours, baseline) == pytest.approx(20 / 15)
    assert perf_per_dollar(baseline, baseline) == 1.0


def test_empty_run_is_an_error():
    with pytest.raises(ValueError):
        summarize([], {"a": 1.0})


def test_table_puts_systems_side_by_side(records):
    base = summarize(records, {"vllm": 30.0})
    ours = summarize(records[:5], {"p": 15.0, "d": 20.0}, ttft_slo_s=0.5)
    table = format_table({"vllm": base, "tetriinfer": ours})
    lines = table.splitlines()
    assert "vllm" in lines[0] and "tetriinfer" in lines[0]
    row = {line.split("  ")[0].strip(): line.split()[-2:] for line in lines[1:]}
    assert row["requests"] == ["10", "5"]
    assert row["TTFT mean (ms)"] == ["550", "300"]
    assert row["perf/$ (x)"] == ["1", "0.667"]
    assert row["goodput (req/s)"][0] == "-"
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_plot_writes_an_image(records, tmp_path):
    path = tmp_path / "cdf.png"
    plot_distributions({"vllm": records, "tetriinfer": records[:3]}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
