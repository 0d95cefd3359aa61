"""`tetriinfer top`: the /metrics parser, rates and histogram quantiles on a live tiny server's text,
and the command itself against that server and against a closed port."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from serve_utils import start_server
from tetriinfer.bench.metrics_view import Histogram, histogram_quantile, parse_snapshot, rates
from tetriinfer.cli import main
from tetriinfer.net import free_port

SERVER_ARGS = ["--prefill-instances", "1", "--decode-instances", "2", "--num-blocks", "256", "--chunk-size", "64",
               "--max-model-len", "512", "--dead-after", "3"]
MAX_TOKENS = [6 + i for i in range(8)]


def send_requests(url: str, max_tokens: list[int]) -> None:
    for i, n in enumerate(max_tokens):
        r = httpx.post(f"{url}/v1/completions", timeout=60, json=dict(
            model="tiny", prompt=f"Request {i}: the quick brown fox " + "jumps " * i, max_tokens=n, ignore_eos=True))
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_server(SERVER_ARGS, tmp_path_factory.mktemp("top")) as server:
        server.wait_for_instances(3)
        yield server


@pytest.fixture(scope="module")
def two_texts(server):
    """/metrics before and after MAX_TOKENS's requests: (text, text)."""
    before = httpx.get(f"{server.url}/metrics", timeout=10).text
    send_requests(server.url, MAX_TOKENS)
    # The cluster's gauges reach /metrics with the instances' next reports: wait until they are idle.
    server.wait_until(lambda: server.metric_sum("tetriinfer_num_waiting") == 0
                      and server.metric_sum("tetriinfer_num_running") == 0, 20, "the instances' idle report")
    return before, httpx.get(f"{server.url}/metrics", timeout=10).text


def reference_quantile(q: float, text: str, name: str) -> float:
    """PromQL's histogram_quantile, from the `name_bucket` lines of `text` read with a regex (no
    prometheus_client): the bucket whose cumulative count first reaches q * total, linear inside it."""
    found = re.findall(rf'^{name}_bucket\{{le="([^"]+)"\}} (\S+)$', text, re.M)
    buckets = sorted((float(le), float(count)) for le, count in found)
    rank = q * buckets[-1][1]
    previous = (0.0, 0.0)
    for le, count in buckets:
        if count >= rank and count > previous[1]:
            if le == float("inf"):
                return previous[0]
            return previous[0] + (le - previous[0]) * (rank - previous[1]) / (count - previous[1])
        previous = (le, count)
    raise AssertionError("no bucket reaches the rank")


def test_the_snapshot_has_one_row_per_instance_with_its_role_and_pid(server, two_texts):
    snap = parse_snapshot(two_texts[1], at=0.0)
    assert {int(r.instance): (r.role, r.pid) for r in snap.instances} == server.instance_pids()
    assert [r.role for r in snap.instances] == ["prefill", "decode", "decode"]
    for row in snap.instances:
        assert row.kv_blocks_total == 256 and not row.draining
        assert 0 <= row.kv_blocks_cached <= row.kv_blocks_total


def test_the_snapshot_counts_what_the_server_served(two_texts):
    before, after = (parse_snapshot(t, at=0.0) for t in two_texts)
    assert after.requests["ok"] - before.requests["ok"] == len(MAX_TOKENS)
    assert after.output_tokens - before.output_tokens == sum(MAX_TOKENS)  # ignore_eos: exactly max_tokens
    assert after.latencies["ttft"].count - before.latencies["ttft"].count == len(MAX_TOKENS)
    assert set(after.latencies) == {"ttft", "tpot", "jct"}
    assert after.flips == 0 and after.restarts == {"controller": 0, "instance": 0}
    assert after.start_time is not None and after.start_time <= time.time()
    assert after.requests_running == 0 and after.requests_waiting == 0
    prefilled = sum(r.prefix_queried_tokens for r in after.instances) - sum(r.prefix_queried_tokens for r in before.instances)
    assert prefilled > 0


@pytest.mark.parametrize("name", ["ttft", "tpot", "jct"])
@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_the_quantile_estimate_matches_a_reference_from_the_bucket_counts(two_texts, name, q):
    text = two_texts[1]
    estimate = histogram_quantile(q, parse_snapshot(text, at=0.0).latencies[name])
    assert estimate == pytest.approx(reference_quantile(q, text, f"tetriinfer_{name}_seconds"), rel=1e-12)


def test_the_quantile_interpolates_inside_its_bucket_and_stops_at_the_last_finite_bound():
    hist = Histogram(((1.0, 0.0), (2.0, 10.0), (4.0, 20.0), (float("inf"), 21.0)), count=21.0, sum=50.0)
    assert histogram_quantile(0.5, hist) == pytest.approx(2.0 + 2.0 * 0.5 / 10)  # rank 10.5: 0.5 of the (2, 4] bucket's 10
    assert histogram_quantile(10 / 21, hist) == pytest.approx(2.0)
    assert histogram_quantile(0.25, hist) == pytest.approx(1.0 + 1.0 * 5.25 / 10)  # rank 5.25 in (1, 2]
    assert histogram_quantile(0.99, hist) == 4.0  # rank 20.79: the +Inf bucket
    assert histogram_quantile(0.5, Histogram(((0.1, 0.0), (float("inf"), 0.0)), 0.0, 0.0)) is None
    assert histogram_quantile(0.5, None) is None


def test_rates_are_counter_deltas_over_the_time_between_the_reads(two_texts):
    before, after = parse_snapshot(two_texts[0], at=10.0), parse_snapshot(two_texts[1], at=14.0)
    r = rates(before, after)
    assert r.seconds == 4.0
    assert r.requests == pytest.approx(len(MAX_TOKENS) / 4)
    assert r.output_tokens == pytest.approx(sum(MAX_TOKENS) / 4)
    old = {row.instance: row for row in before.instances}
    for row in after.instances:
        assert r.kv_transfers[row.instance] == pytest.approx((row.kv_transfers - old[row.instance].kv_transfers) / 4)
        assert r.kv_bytes[row.instance] == pytest.approx((row.kv_transfer_bytes - old[row.instance].kv_transfer_bytes) / 4)
    assert sum(r.kv_bytes.values()) > 0  # requests moved from the prefill instance to the decode instances
    backwards = rates(after, parse_snapshot(two_texts[0], at=15.0))  # a server restarted: counters reset
    assert backwards.requests is None and backwards.output_tokens is None


def instance_rows(output: str) -> list[tuple[str, str]]:
    """(id, role) of each instance row the view printed."""
    return re.findall(r"^\s*(\d+)\s+(prefill|decode|colocated)\s+\d+\s", output, re.M)


@pytest.mark.parametrize("flags", [["--plain"], []], ids=["plain", "rich"])
def test_top_once_prints_one_row_per_instance_and_exits_0(server, two_texts, flags):
    result = subprocess.run([sys.executable, "-m", "tetriinfer.cli", "top", "--url", server.url, "--once",
                             "--interval", "0.2", *flags], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert instance_rows(result.stdout) == [("0", "prefill"), ("1", "decode"), ("2", "decode")], result.stdout
    assert "model tiny" in result.stdout and "TTFT p50" in result.stdout and "req/s" in result.stdout


def test_top_falls_back_to_plain_text_without_rich(server, two_texts, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rich", None)  # `import rich` raises ImportError
    assert main(["top", "--url", server.url, "--once", "--interval", "0.1"]) == 0
    out = capsys.readouterr().out
    assert len(instance_rows(out)) == 3 and "KV USED" in out


def test_top_once_against_a_closed_port_exits_non_zero_with_a_clear_message():
    url = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, "-m", "tetriinfer.cli", "top", "--url", url, "--once", "--timeout", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"cannot reach {url}/metrics" in result.stderr and "Traceback" not in result.stderr + result.stdout


def test_ctrl_c_stops_the_live_view_with_status_0(server):
    process = subprocess.Popen([sys.executable, "-m", "tetriinfer.cli", "top", "--url", server.url, "--plain",
                                "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert any("ROLE" in process.stdout.readline() for _ in range(20)), "no view drawn"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in err, err


def test_the_help_says_rich_gives_the_nicer_view():
    result = subprocess.run([sys.executable, "-m", "tetriinfer.cli", "top", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "pip install rich" in " ".join(result.stdout.split())
