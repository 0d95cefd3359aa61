"""More workloads: Vidur/Splitwise traces, multi-turn conversations, bursty arrivals."""

import argparse
import csv
import gzip
import random
import statistics

import pytest

from tetriinfer.bench.arrivals import BURSTY_CV
from tetriinfer.bench.conversation import REPLY_S_PER_TOKEN, plan_conversations
from tetriinfer.bench.traces import LENGTH_TRACES, SPLITWISE_TRACES
from tetriinfer.bench.traces import open_text
from tetriinfer.bench.workload import (
    ALL_WORKLOADS,
    BUNDLED_DATA,
    DATA_DIR_ENV,
    RequestSpec,
    build_specs,
    make_workload,
    sharegpt_sessions,
)

NEW_WORKLOADS = tuple(SPLITWISE_TRACES) + tuple(LENGTH_TRACES) + ("conversation",)


def _file_rows(file: str) -> list[dict]:
    with open_text(BUNDLED_DATA / "vidur-traces" / f"{file}.gz") as f:
        return list(csv.DictReader(f))


def _gap_cv(requests: list[RequestSpec]) -> float:
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(requests, requests[1:])]
    return statistics.stdev(gaps) / statistics.mean(gaps)


def _rate(requests: list[RequestSpec]) -> float:
    return (len(requests) - 1) / (requests[-1].arrival_s - requests[0].arrival_s)


@pytest.fixture
def real(monkeypatch):
    """The real data, as shipped in the package."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


@pytest.fixture
def fake_sessions(tmp_path, monkeypatch):
    """Three conversations (chars = 4 x tokens): a (3 turns), b (2 turns, an empty reply), c (1 turn)."""
    share = tmp_path / "sharegpt-v3-partial"
    share.mkdir()
    rows = [  # id, turn, context, prompt, response in tokens; listed out of turn order on purpose
        ("a_0", 2, 150, 10, 40),
        ("a_0", 0, 0, 100, 50),
        ("a_0", 4, 200, 20, 1000),
        ("b_0", 0, 0, 30, 0),  # no reply text: skipped, as in the mixes
        ("b_0", 2, 30, 5, 60),
        ("c_0", 0, 0, 7, 8),
    ]
    lines = ["id,turn,context_chars_before,prompt_chars,response_chars,prompt_words,response_words"]
    lines += [f"{i},{t},{4 * c},{4 * p},{4 * r},1,1" for i, t, c, p, r in rows]
    with gzip.open(share / "pair_lengths.csv.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))


def test_splitwise_traces_replay_their_arrived_at_and_equal_the_azure_traces(real):
    assert make_workload("splitwise-conv", 2, arrival="trace") == [
        RequestSpec(0, 0.0, 374, 44),
        RequestSpec(1, pytest.approx(4.314579), 396, 109),
    ]
    for name in SPLITWISE_TRACES:
        ours = make_workload(name, 300, arrival="trace")
        azure = make_workload(name.replace("splitwise", "azure"), 300, arrival="trace")
        assert [(r.prompt_tokens, r.output_tokens) for r in ours] == [(r.prompt_tokens, r.output_tokens) for r in azure]
        assert [r.arrival_s for r in ours] == pytest.approx([r.arrival_s for r in azure], abs=1e-5)
    # build_specs replays a timed trace's timestamps by default, like the Azure ones.
    assert build_specs("splitwise-code", 50) == make_workload("splitwise-code", 50, arrival="trace")
    assert all(r.arrival_s == 0.0 for r in make_workload("splitwise-code", 5))


def test_lengths_only_traces_draw_file_rows_with_the_seed(real):
    for name, file in LENGTH_TRACES.items():
        rows = _file_rows(file)
        in_file = {(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in rows}
        requests = make_workload(name, 200, seed=4)
        assert [r.request_id for r in requests] == list(range(200)) and all(r.arrival_s == 0 for r in requests)
        drawn = [(r.prompt_tokens, r.output_tokens) for r in requests]
        assert set(drawn) <= in_file and len(set(drawn)) > 150  # without replacement: few equal rows
        assert requests == make_workload(name, 200, seed=4)
        assert requests != make_workload(name, 200, seed=5)
    arxiv = _file_rows(LENGTH_TRACES["vidur-arxiv"])[0]  # 3772,54: a long prompt, a short summary
    assert (int(arxiv["num_prefill_tokens"]), int(arxiv["num_decode_tokens"])) == (3772, 54)
    with pytest.raises(ValueError, match="no timestamps"):
        make_workload("vidur-bwb", 5, arrival="trace")


def test_max_total_tokens_is_respected_by_every_new_workload(real):
    cap = 1500
    for name in NEW_WORKLOADS:
        arrival = "trace" if name in SPLITWISE_TRACES else "poisson"
        uncapped = make_workload(name, 300, seed=1, arrival=arrival, rate=5.0)
        capped = make_workload(name, 300, seed=1, arrival=arrival, rate=5.0, max_total_tokens=cap)
        assert any(r.prompt_tokens + r.output_tokens > cap for r in uncapped), name  # the cap binds
        assert len(capped) == 300 and all(r.prompt_tokens + r.output_tokens <= cap for r in capped), name
    with pytest.raises(ValueError, match="no row has prompt \\+ output <= 10"):
        make_workload("vidur-bwb", 5, max_total_tokens=10)


def test_conversation_turns_resend_a_growing_history(real):
    sessions = plan_conversations(sharegpt_sessions(), 400, "poisson", 2.0, random.Random(0))
    assert sum(len(s) for s in sessions) == 400 and max(len(s) for s in sessions) > 3
    for session in sessions:
        for (t0, p0, o0), (t1, p1, _) in zip(session, session[1:]):
            assert p1 >= p0 + o0 - 1  # the history holds the previous prompt and reply (chars/4 rounding)
            assert t1 - t0 >= o0 * REPLY_S_PER_TOKEN  # the reply is out before the next turn
    requests = make_workload("conversation", 400, seed=0, arrival="poisson", rate=2.0)
    assert [r.request_id for r in requests] == list(range(400))
    assert [r.arrival_s for r in requests] == sorted(r.arrival_s for r in requests)
    assert sorted((t, p, o) for s in sessions for t, p, o in s) == [
        (r.arrival_s, r.prompt_tokens, r.output_tokens) for r in requests
    ]
    assert requests == make_workload("conversation", 400, seed=0, arrival="poisson", rate=2.0)
    assert requests != make_workload("conversation", 400, seed=1, arrival="poisson", rate=2.0)


def test_conversation_takes_whole_sessions_in_turn_order_and_truncates_the_last(fake_sessions):
    assert sharegpt_sessions() == (((100, 50), (160, 40), (220, 1000)), ((35, 60),), ((7, 8),))
    # 5 requests out of 5 turns: every session whole.
    requests = make_workload("conversation", 5, arrival="poisson", rate=1.0)
    assert sorted((r.prompt_tokens, r.output_tokens) for r in requests) == [
        (7, 8), (35, 60), (100, 50), (160, 40), (220, 1000)
    ]
    assert requests[0].arrival_s == 0.0
    # Fewer requests: sessions are prefixes of the records, only one of them cut short.
    for seed in range(6):
        planned = plan_conversations(sharegpt_sessions(), 2, "poisson", 1.0, random.Random(seed))
        turns = [[(p, o) for _, p, o in s] for s in planned]
        assert sum(map(len, turns)) == 2
        assert all(s == list(full[: len(s)]) for s in turns for full in sharegpt_sessions() if full[0] == s[0])
    # A session ends at its first turn over the cap (220 + 1000 tokens), later turns or not.
    capped = make_workload("conversation", 40, arrival="poisson", rate=1.0, max_total_tokens=1000)
    assert {(r.prompt_tokens, r.output_tokens) for r in capped} == {(7, 8), (35, 60), (100, 50), (160, 40)}


@pytest.mark.parametrize("name", ["conversation", "vidur-sharegpt", "splitwise-conv", "mixed"])
def test_poisson_request_rate_is_close_to_rate(real, name):
    requests = make_workload(name, 400, seed=2, arrival="poisson", rate=1.0)
    assert _rate(requests) == pytest.approx(1.0, rel=0.25)


def test_bursty_arrivals_have_the_mean_rate_and_a_much_larger_cv(real):
    for name in ("mixed", "vidur-arxiv"):
        poisson = make_workload(name, 3000, seed=3, arrival="poisson", rate=4.0)
        bursty = make_workload(name, 3000, seed=3, arrival="bursty", rate=4.0)
        assert _gap_cv(poisson) < 1.2 and _gap_cv(bursty) > 2.5
        assert _rate(bursty) == pytest.approx(4.0, rel=0.25)
    # Conversations: the sessions start in bursts (their later turns spread out by think times).
    starts = {}
    for arrival in ("poisson", "bursty"):
        sessions = plan_conversations(sharegpt_sessions(), 3000, arrival, 4.0, random.Random(3))
        starts[arrival] = [RequestSpec(0, s[0][0], 1, 1) for s in sessions]
    assert _gap_cv(starts["poisson"]) < 1.2 and _gap_cv(starts["bursty"]) > BURSTY_CV / 2


def test_conversation_needs_an_open_loop_arrival(real):
    for arrival in ("closed", "trace"):
        with pytest.raises(ValueError, match="use poisson or bursty"):
            make_workload("conversation", 10, arrival=arrival, rate=1.0)
    with pytest.raises(ValueError, match="use poisson or bursty"):
        build_specs("conversation", 10)  # no rate: build_specs asks for a closed batch
    with pytest.raises(ValueError, match="bursty arrival needs rate > 0"):
        make_workload("conversation", 10, arrival="bursty")


def test_build_specs_takes_an_arrival_override(real, tmp_path):
    assert build_specs("vidur-bwb", 30, rate=2.0, seed=1, arrival="bursty") == make_workload(
        "vidur-bwb", 30, seed=1, arrival="bursty", rate=2.0
    )
    assert build_specs("mixed", 30, rate=2.0, seed=1) == make_workload("mixed", 30, seed=1, arrival="poisson", rate=2.0)
    assert build_specs("conversation", 30, rate=2.0, max_total_tokens=2048) == make_workload(
        "conversation", 30, arrival="poisson", rate=2.0, max_total_tokens=2048
    )
    path = tmp_path / "trace.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0,10,5\n")
    with pytest.raises(ValueError, match="keeps its own arrival times"):
        build_specs("mixed", 1, trace=str(path), arrival="poisson")


def test_unknown_workload_error_lists_every_name():
    with pytest.raises(ValueError, match="known workloads: .*vidur-bwb.*conversation") as error:
        make_workload("vidur-lmsys", arrival="poisson", rate=1.0)
    assert all(name in str(error.value) for name in ALL_WORKLOADS)


def test_simulate_help_lists_every_workload():
    from tetriinfer.bench.simulate import add_parser

    subparsers = argparse.ArgumentParser().add_subparsers()
    add_parser(subparsers)
    help_text = subparsers.choices["simulate"].format_help().replace("\n", "").replace(" ", "")
    assert all(name in help_text for name in ALL_WORKLOADS)
