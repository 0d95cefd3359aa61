"""Workloads: the paper's mixes, trace replay, arrivals, and the CSV trace reader."""

import gzip
import statistics

import pytest

from tetriinfer.bench.workload import (
    DATA_DIR_ENV,
    WORKLOADS,
    RequestSpec,
    classify,
    data_dir,
    load_trace,
    make_workload,
)



@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    """A data folder in the real files' formats, with pairs of known classes (chars = 4 x tokens)."""
    share = tmp_path / "sharegpt-v3-partial"
    share.mkdir()
    lines = ["id,turn,context_chars_before,prompt_chars,response_chars,prompt_words,response_words"]
    for i in range(40):
        prompt_tokens = 100 + i if i % 2 == 0 else 600 + i  # even: light prompt, odd: heavy
        output_tokens = 50 if i % 4 < 2 else 300  # i % 4 in {0, 1}: light decode
        lines.append(f"c{i}_0,0,{4 * 1000},{4 * prompt_tokens},{4 * output_tokens},1,1")
    lines.append("empty_0,0,0,0,400,0,60")  # no prompt text: skipped
    with gzip.open(share / "pair_lengths.csv.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    azure = tmp_path / "azure-llm-2023"
    azure.mkdir()
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"2023-11-16 23:59:5{i}.5000000,{1000 + i},{10 + i}" for i in range(8)]
    rows += ["2023-11-17 00:00:01.2500000,2000,5"]  # across midnight
    (azure / "AzureLLMInferenceTrace_code.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    return tmp_path


def test_each_mix_draws_only_its_class(fake_data):
    for name in ("lpld", "lphd", "hpld", "hphd"):
        requests = make_workload(name, 10)
        assert {classify(r.prompt_tokens, r.output_tokens, 512, 128) for r in requests} == {name}
        assert len({(r.prompt_tokens, r.output_tokens) for r in requests}) == 10  # no repeats while the pool lasts


def test_mixed_is_a_quarter_of_each_class(fake_data):
    requests = make_workload("mixed", 8)
    classes = [classify(r.prompt_tokens, r.output_tokens, 512, 128) for r in requests]
    assert sorted(classes) == sorted(["lpld", "lphd", "hpld", "hphd"] * 2)


def test_thresholds_and_history_are_configurable(fake_data):
    # With the conversation so far in the prompt (1000 tokens of history), every prompt is heavy.
    assert all(r.prompt_tokens > 1000 for r in make_workload("hpld", 5, with_history=True))
    with pytest.raises(ValueError, match="no ShareGPT pair falls in class lpld"):
        make_workload("lpld", 5, with_history=True)
    # A 700-token threshold leaves only the heavy prompts of 700+ tokens... of which there are none.
    with pytest.raises(ValueError, match="hpld"):
        make_workload("hpld", 3, heavy_prompt_tokens=700)
    capped = make_workload("lphd", 50, max_total_tokens=420)  # 5 of the 10 lphd pairs fit
    assert {r.prompt_tokens + r.output_tokens for r in capped} == {402, 406, 410, 414, 418}


def test_more_requests_than_pairs_samples_with_replacement(fake_data):
    requests = make_workload("lpld", 25)
    assert len(requests) == 25 and len({(r.prompt_tokens, r.output_tokens) for r in requests}) <= 10
    assert all(classify(r.prompt_tokens, r.output_tokens, 512, 128) == "lpld" for r in requests)


def test_closed_and_poisson_arrivals(fake_data):
    assert all(r.arrival_s == 0.0 for r in make_workload("lphd", 10))
    requests = make_workload("mixed", 2000, arrival="poisson", rate=4.0, seed=3)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(requests, requests[1:])]
    assert requests[0].arrival_s == 0.0 and min(gaps) >= 0
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.08)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.1)  # exponential: stdev = mean
    with pytest.raises(ValueError, match="rate"):
        make_workload("mixed", 10, arrival="poisson")


def test_seeds_give_reproducible_and_different_workloads(fake_data):
    assert make_workload("mixed", 16, seed=1, arrival="poisson", rate=1.0) == make_workload(
        "mixed", 16, seed=1, arrival="poisson", rate=1.0
    )
    assert make_workload("mixed", 16, seed=1) != make_workload("mixed", 16, seed=2)


def test_azure_trace_replays_its_timestamps_rebased_to_zero(fake_data):
    requests = make_workload("azure-code", 9, arrival="trace")
    assert [r.request_id for r in requests] == list(range(9))
    assert requests[0] == RequestSpec(0, 0.0, 1000, 10)
    assert requests[3].arrival_s == pytest.approx(3.0)
    assert requests[8].arrival_s == pytest.approx(10.75)  # 23:59:50.5 -> 00:00:01.25
    assert all(r.arrival_s == 0 for r in make_workload("azure-code", 4))
    with pytest.raises(ValueError, match="fewer than"):
        make_workload("azure-code", 10)
    with pytest.raises(ValueError, match="no timestamps"):
        make_workload("lpld", 4, arrival="trace")


def test_unknown_workload_and_missing_data(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="known workloads"):
        make_workload("nope")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        data_dir()


def test_load_trace_reads_our_csv_as_written(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens,note\n0.5,100,20,a\n0.5,7,1,b\n2.25,3000,400,c\n")
    assert load_trace(path) == [
        RequestSpec(0, 0.5, 100, 20),
        RequestSpec(1, 0.5, 7, 1),
        RequestSpec(2, 2.25, 3000, 400),
    ]


@pytest.mark.parametrize(
    "body, message",
    [
        ("arrival,prompt_tokens,output_tokens\n0,1,1\n", "unknown trace header"),
        ("arrival_s,prompt_tokens,output_tokens\n0,10,5\n1,ten,5\n", r"trace.csv:3: expected a time and two integers"),
        ("arrival_s,prompt_tokens,output_tokens\n0,10,5\n1,10\n", r"trace.csv:3: expected"),
        ("arrival_s,prompt_tokens,output_tokens\n0,10,0\n", r"trace.csv:2: need .* token counts >= 1"),
        ("arrival_s,prompt_tokens,output_tokens\n-1,10,5\n", r"trace.csv:2: need arrivals >= 0"),
        ("arrival_s,prompt_tokens,output_tokens\n2,10,5\n1,10,5\n", r"trace.csv:3: .*sort the file"),
        ("arrival_s,prompt_tokens,output_tokens\n", "no requests"),
    ],
)
def test_load_trace_names_the_bad_line(tmp_path, body, message):
    path = tmp_path / "trace.csv"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_trace(path)


def test_real_data_gives_every_workload(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    for name in WORKLOADS:
        requests = make_workload(name, 128)
        assert len(requests) == 128 and all(r.prompt_tokens >= 1 and r.output_tokens >= 1 for r in requests)
    conv = make_workload("azure-conv", 1000, arrival="trace")
    rate = len(conv) / conv[-1].arrival_s
    assert 3 < rate < 8  # the README: 5.53 requests/s on average


def test_back_to_back_phases_follow_each_other():
    from tetriinfer.bench.workload import RequestSpec, back_to_back

    first = [RequestSpec(0, 1.0, 10, 5), RequestSpec(1, 2.5, 20, 6)]
    second = [RequestSpec(0, 0.5, 30, 7), RequestSpec(1, 1.5, 40, 8)]
    joined = back_to_back(first, second)
    assert [s.request_id for s in joined] == [0, 1, 2, 3]
    assert [s.arrival_s for s in joined] == [0.0, 1.5, 1.5, 2.5]
    assert [s.prompt_tokens for s in joined] == [10, 20, 30, 40]
