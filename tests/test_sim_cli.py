"""`tetriinfer simulate` end to end: table, JSON and plot."""

import json
from pathlib import Path

from tetriinfer.cli import main


def test_compare_prints_a_table_and_writes_json_and_plot(tmp_path, capsys):
    out, plot = tmp_path / "run.json", tmp_path / "cdf.png"
    code = main([
        "simulate", "--compare", "vllm,sarathi,tetriinfer", "--workload", "lphd", "--num-requests", "32",
        "--rate", "8", "--ttft-slo", "1.0", "--json", str(out), "--plot", str(plot), "--no-progress",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "TTFT p99 (ms)" in printed and "tetriinfer" in printed
    report = json.loads(out.read_text())
    assert set(report) == {"vllm", "sarathi", "tetriinfer"}
    assert all(r["summary"]["num_requests"] == 32 for r in report.values())
    assert report["tetriinfer"]["config"]["cluster"]["shape"]["num_prefill"] == 1
    assert plot.stat().st_size > 0


def test_trace_file_runs_one_system(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,100,20\n0.5,900,3\n1.0,30,200\n")
    assert main(["simulate", "--system", "disagg", "--trace", str(trace), "--no-progress"]) == 0
    assert "disagg" in capsys.readouterr().out


def test_measured_profile_replaces_the_roofline(capsys):
    profile = Path(__file__).parent / "data" / "profile_example.json"
    args = ["simulate", "--workload", "lpld", "--num-requests", "16", "--no-progress"]
    assert main(args + ["--profile", str(profile)]) == 0
    with_profile = capsys.readouterr().out
    assert main(args) == 0
    with_roofline = capsys.readouterr().out
    assert "profile_example.json" in with_profile
    # The example profile was sampled from the roofline: interpolation moves the numbers a little.
    assert with_profile.splitlines()[1:] != with_roofline.splitlines()[1:]
