"""ShareGPT examples and the split: prompts carry earlier turns, no conversation leaks across splits."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from tetriinfer.sched.lengths import BucketSpec
from tetriinfer.predictor.metrics import kendall_tau_b
from tetriinfer.predictor.sources import (
    SPLITS, conversation_group, format_chat, sharegpt_examples, split_examples, split_of,
)

SHAREGPT = Path(__file__).resolve().parents[2] / "shared" / "data" / "sharegpt-v3-partial"


def _record(record_id, turns):
    return {"id": record_id, "conversations": [{"from": r, "value": v} for r, v in turns]}


def _write_sharegpt(tmp_path, records):
    with gzip.open(tmp_path / "sharegpt_v3_partial.jsonl.gz", "wt", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def test_examples_carry_context_and_skip_unanswered_turns(tmp_path):
    _write_sharegpt(tmp_path, [
        _record("abc_0", [("human", "first?"), ("gpt", "one"), ("human", "second?"), ("gpt", "two two"),
                          ("human", "no reply")]),
        _record("abc_1", [("system", "be nice"), ("human", "third?"), ("gpt", "three")]),
    ])
    examples = sharegpt_examples(tmp_path, context_chars=10_000)
    assert [ex.response for ex in examples] == ["one", "two two", "three"]
    assert examples[1].prompt == "USER: first?\nASSISTANT: one\nUSER: second?\n"
    assert examples[2].prompt == "SYSTEM: be nice\nUSER: third?\n"
    assert {ex.group for ex in examples} == {"abc"}  # chunks of one conversation form one group
    capped = sharegpt_examples(tmp_path, context_chars=5)
    assert capped[1].prompt == " one\n" + "USER: second?\n"  # the last 5 context chars


def test_format_chat_matches_training_layout():
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "first?"},
                {"role": "assistant", "content": "one"}, {"role": "user", "content": "second?"}]
    assert format_chat(messages) == "SYSTEM: be nice\nUSER: first?\nASSISTANT: one\nUSER: second?\n"


def test_conversation_group_strips_chunk_suffix():
    assert conversation_group("QWJhYvA_12") == "QWJhYvA"
    assert conversation_group("plain") == "plain"


def test_split_is_deterministic_and_roughly_80_10_10():
    groups = [f"conv{i}" for i in range(5000)]
    first = [split_of(g) for g in groups]
    assert first == [split_of(g) for g in groups]
    shares = {s: first.count(s) / len(groups) for s in SPLITS}
    assert 0.77 < shares["train"] < 0.83 and 0.08 < shares["val"] < 0.12 and 0.08 < shares["test"] < 0.12


def _assert_no_leakage(splits):
    seen = {name: {ex.group for ex in exs} for name, exs in splits.items()}
    assert not seen["train"] & seen["val"]
    assert not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]


def test_split_keeps_each_conversation_on_one_side(tmp_path):
    records = [_record(f"c{i}_{k}", [("human", f"q{i}.{k}"), ("gpt", "a")]) for i in range(300) for k in range(3)]
    _write_sharegpt(tmp_path, records)
    splits = split_examples(sharegpt_examples(tmp_path))
    assert sum(len(v) for v in splits.values()) == 900
    assert all(splits[name] for name in SPLITS)
    _assert_no_leakage(splits)


@pytest.mark.skipif(not SHAREGPT.is_dir(), reason="shared ShareGPT data not present")
def test_real_sharegpt_split_has_no_leakage():
    splits = split_examples(sharegpt_examples(SHAREGPT))
    _assert_no_leakage(splits)
    assert len(splits["train"]) > 40_000 and len(splits["test"]) > 4_000


def test_buckets():
    spec = BucketSpec.covering(200, open_from=1000)
    assert spec.num_buckets == 6
    assert [spec.bucket_of(t) for t in (0, 199, 200, 999, 1000, 50_000)] == [0, 0, 1, 4, 5, 5]
    assert (spec.lower(1), spec.upper(1)) == (200, 400)
    assert spec.upper(5) == spec.max_output_tokens
    assert BucketSpec.covering(400).num_buckets == 4  # 0, 400, 800, then the open 1200+
    with pytest.raises(ValueError):
        BucketSpec(granularity=0)


def test_kendall_tau_b_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, 60).astype(float)
    y = x + rng.integers(-2, 3, 60)
    conc = disc = tx = ty = 0
    for i in range(60):
        for j in range(i + 1, 60):
            a, b = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            conc += a * b > 0
            disc += a * b < 0
            tx += a == 0
            ty += b == 0
    n0 = 60 * 59 / 2
    expected = (conc - disc) / np.sqrt((n0 - tx) * (n0 - ty))
    assert kendall_tau_b(x, y, block=7) == pytest.approx(expected)
    assert np.isnan(kendall_tau_b(np.ones(5), np.arange(5)))
