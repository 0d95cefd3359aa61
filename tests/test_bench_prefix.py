"""Prefix block ids in the workloads: Mooncake JSONL traces, the conversation workload's ids, and
`bench serve` prompts whose equal ids are equal token blocks."""

import json
from pathlib import Path

import pytest

from tetriinfer.bench.serve_client import prompt_token_ids
from tetriinfer.bench.traces import HASH_BLOCK_TOKENS, read_mooncake_jsonl
from tetriinfer.bench.workload import build_specs, make_workload
from tetriinfer.cli import main

SAMPLE = Path(__file__).parent / "data" / "mooncake_sample.jsonl"


def test_a_mooncake_trace_reads_with_its_hash_ids_and_seconds():
    rows = read_mooncake_jsonl(SAMPLE)
    specs = build_specs("mixed", 1, trace=str(SAMPLE))
    assert len(specs) == len(rows) == 13
    first = json.loads(SAMPLE.read_text().splitlines()[0])
    assert specs[0].arrival_s == first["timestamp"] / 1000
    assert specs[0].prompt_tokens == first["input_length"] and specs[0].hash_ids == tuple(first["hash_ids"])
    assert [s.request_id for s in specs] == list(range(13))
    for s in specs:  # one id per 512 prompt tokens, the last block maybe partial
        assert len(s.hash_ids) == -(-s.prompt_tokens // HASH_BLOCK_TOKENS)


def test_a_bad_mooncake_line_names_the_file_and_line(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n{"timestamp": 5}\n')
    with pytest.raises(ValueError, match="t.jsonl:2"):
        read_mooncake_jsonl(bad)


def test_simulate_reads_a_mooncake_trace_and_reports_hits(capsys):
    assert main(["simulate", "--system", "sarathi", "--trace", str(SAMPLE), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "13 requests" in out and "prefix cache hit rate" in out
    assert main(["simulate", "--system", "sarathi", "--trace", str(SAMPLE), "--no-progress",
                 "--prefix-cache-fraction", "0", "--no-cache-aware-routing"]) == 0
    assert "hit rate" not in capsys.readouterr().out


def test_each_conversation_turn_starts_with_the_previous_turns_prompt_and_answer_blocks():
    specs = make_workload("conversation", 400, arrival="poisson", rate=5.0, seed=4)
    by_session: dict[int, list] = {}
    for s in specs:
        assert len(s.hash_ids) == -(-s.prompt_tokens // HASH_BLOCK_TOKENS)
        by_session.setdefault(s.hash_ids[0] >> 20, []).append(s)
    followed = 0
    for turns in by_session.values():
        assert len({t.hash_ids[0] for t in turns}) == 1  # one conversation, one chain head
        for prev, nxt in zip(turns, turns[1:]):
            shared = (prev.prompt_tokens + prev.output_tokens) // HASH_BLOCK_TOKENS
            assert nxt.prompt_tokens >= prev.prompt_tokens + prev.output_tokens - 2  # the history is resent
            assert nxt.hash_ids[:len(prev.hash_ids)] == prev.hash_ids  # the previous prompt's blocks
            assert nxt.hash_ids[:shared] == tuple(turns[0].hash_ids[0] + i for i in range(shared))  # + its answer's
            followed += 1
    assert followed > 100
    heads = [t[0].hash_ids[0] for t in by_session.values()]
    assert len(heads) == len(set(heads))  # no two conversations share a block


def test_prompts_sharing_k_hash_ids_share_exactly_k_blocks_of_tokens():
    a = prompt_token_ids(0, 3 * 512 + 100, vocab_size=32000, seed=1, hash_ids=(5, 6, 7, 8))
    b = prompt_token_ids(1, 4 * 512, vocab_size=32000, seed=1, hash_ids=(5, 6, 9, 10))
    assert len(a) == 3 * 512 + 100 and len(b) == 4 * 512
    assert a[:1024] == b[:1024]
    assert a[1024:1536] != b[1024:1536]
    assert all(0 <= t < 32000 for t in a + b)
    # A partial block is the head of the same id's full block; without ids prompts share nothing.
    short = prompt_token_ids(2, 512 + 10, vocab_size=32000, seed=1, hash_ids=(5, 6))
    assert short == a[:522]
    plain = prompt_token_ids(0, 600, vocab_size=32000, seed=1)
    assert plain == prompt_token_ids(0, 600, vocab_size=32000, seed=1, hash_ids=None)
    assert plain[:512] != a[:512]
    # Tokens past the ids are the request's own.
    long = prompt_token_ids(3, 3 * 512, vocab_size=32000, seed=1, hash_ids=(5,))
    assert long[:512] == a[:512] and long[512:1024] != a[512:1024]
