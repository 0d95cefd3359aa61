"""Trace files as their publishers ship them: Azure (2023 and 2024 clocks), BurstGPT, Vidur, gzip."""

import gzip
import logging

import pytest

from tetriinfer.bench.trace_files import read_trace, wall_clock_seconds
from tetriinfer.bench.workload import RequestSpec, load_trace
from tetriinfer.cli import main


def test_wall_clock_reads_the_2023_and_2024_azure_stamps_to_the_microsecond():
    base = wall_clock_seconds("2023-11-16 18:17:03")
    assert wall_clock_seconds("2023-11-16 18:17:03.9799600") - base == pytest.approx(0.97996, abs=1e-6)
    # 2024 stamps carry a zone; +01:00 is an hour earlier in UTC than the same wall time at +00:00.
    utc = wall_clock_seconds("2024-05-10 00:00:00.009930+00:00")
    assert utc - wall_clock_seconds("2024-05-10 00:00:00") == pytest.approx(0.00993, abs=1e-6)
    assert utc - wall_clock_seconds("2024-05-10 01:00:00.009930+01:00") == pytest.approx(0.0, abs=1e-6)
    assert wall_clock_seconds("2024-05-10T00:00:01Z") - wall_clock_seconds("2024-05-10 00:00:00") == 1.0
    with pytest.raises(ValueError, match="not a timestamp"):
        wall_clock_seconds("yesterday")


def test_an_azure_2024_trace_is_rebased_and_its_failed_rows_left_out(tmp_path, caplog):
    path = tmp_path / "AzureLLMInferenceTrace_code_1week.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00.500000+00:00,2048,12\n"
        "2024-05-10 00:00:01.000000+00:00,31,0\n"
        "2024-05-10 00:00:02.250000+00:00,700,300\n"
    )
    with caplog.at_level(logging.WARNING):
        specs = load_trace(path)
    assert specs == [RequestSpec(0, 0.0, 2048, 12), RequestSpec(1, pytest.approx(1.75), 700, 300)]
    assert "left out 1 rows with zero tokens" in caplog.text


def test_a_burstgpt_trace_reads_its_token_columns_and_keeps_its_seconds(tmp_path):
    path = tmp_path / "BurstGPT_1.csv"
    path.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,ChatGPT,1087,0,1087,Conversation log\n"
        "118,GPT-4,417,276,693,API log\n"
    )
    trace = read_trace(path)
    assert (trace.layout, trace.skipped, trace.timed) == ("burstgpt", 1, True)
    assert load_trace(path) == [RequestSpec(0, 5.0, 472, 18), RequestSpec(1, 118.0, 417, 276)]


def test_a_gzipped_vidur_trace_with_arrivals_reads_like_the_plain_one(tmp_path):
    body = "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5\n0.25,20,6\n"
    plain, packed = tmp_path / "t.csv", tmp_path / "t.csv.gz"
    plain.write_text(body)
    with gzip.open(packed, "wt") as f:
        f.write(body)
    assert load_trace(packed) == load_trace(plain) == [RequestSpec(0, 0.0, 10, 5), RequestSpec(1, 0.25, 20, 6)]


def test_a_lengths_only_trace_takes_drawn_arrivals_and_refuses_trace_arrival(tmp_path):
    path = tmp_path / "lengths.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens,pd_ratio\n" + "".join(f"{10 + i},{5 + i},2\n" for i in range(200)))
    closed = load_trace(path)
    assert [s.arrival_s for s in closed] == [0.0] * 200
    poisson = load_trace(path, rate=50.0, seed=3)
    assert [(s.prompt_tokens, s.output_tokens) for s in poisson] == [(10 + i, 5 + i) for i in range(200)]
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(poisson, poisson[1:])]
    assert min(gaps) >= 0 and 0.01 < sum(gaps) / len(gaps) < 0.03  # mean gap 1/50 s
    assert load_trace(path, rate=50.0, seed=3) == poisson
    with pytest.raises(ValueError, match="no arrival times"):
        load_trace(path, arrival="trace")


def test_a_timed_trace_refuses_a_drawn_arrival_and_drops_rows_over_the_context(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,20\n1,4000,200\n2,50,50\n")
    with pytest.raises(ValueError, match="keeps its own arrival times"):
        load_trace(path, arrival="poisson", rate=1.0)
    assert load_trace(path, max_total_tokens=1024) == [RequestSpec(0, 0.0, 100, 20), RequestSpec(1, 2.0, 50, 50)]


def test_a_public_trace_of_only_failed_rows_is_an_error_that_says_so(tmp_path):
    path = tmp_path / "b.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n1,GPT-4,10,0,10,API log\n")
    with pytest.raises(ValueError, match=r"no requests after the header \(1 rows with zero tokens\)"):
        read_trace(path)


def test_simulate_runs_a_burstgpt_trace_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "BurstGPT_1.csv"
    path.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        + "".join(f"{i * 0.2},ChatGPT,{100 + 37 * i},{5 + 11 * i},0,Conversation log\n" for i in range(12))
    )
    assert main(["simulate", "--system", "sarathi", "--trace", str(path), "--no-progress"]) == 0
    assert "12 requests of" in capsys.readouterr().out
