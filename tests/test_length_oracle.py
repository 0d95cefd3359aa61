"""The simulator's length oracle: its accuracy, where its errors fall, and determinism."""

from collections import Counter

import pytest

from tetriinfer.sim.length_oracle import OracleLengthPredictor


def offsets(predictor, output_tokens, n=20_000):
    truth = predictor.true_bucket(output_tokens)
    return Counter(predictor.predict(output_tokens) - truth for _ in range(n))


def test_accuracy_matches_the_setting():
    for accuracy in (0.749, 0.5, 1.0):
        counts = offsets(OracleLengthPredictor(accuracy=accuracy, seed=1), 650)
        assert counts[0] / 20_000 == pytest.approx(accuracy, abs=0.015)


def test_errors_fall_mostly_in_neighbouring_buckets():
    counts = offsets(OracleLengthPredictor(seed=2), 1050)
    errors = 20_000 - counts[0]
    assert (counts[1] + counts[-1]) / errors > 0.7
    assert counts[1] == pytest.approx(counts[-1], rel=0.15)  # no side favoured


def test_never_predicts_a_bucket_that_does_not_exist():
    low = OracleLengthPredictor(accuracy=0.0, seed=3)
    assert all(low.predict(10) >= 1 for _ in range(2000))  # bucket 0's errors go up, never to -1
    bounded = OracleLengthPredictor(accuracy=0.0, seed=3, num_buckets=3)
    predictions = {bounded.predict(5000) for _ in range(2000)}
    assert predictions <= {0, 1} and bounded.true_bucket(5000) == 2
    single = OracleLengthPredictor(accuracy=0.0, num_buckets=1)
    assert single.predict(999) == 0


def test_buckets_are_200_tokens_wide():
    predictor = OracleLengthPredictor(accuracy=1.0)
    assert [predictor.predict(n) for n in (0, 199, 200, 399, 400)] == [0, 0, 1, 1, 2]
    assert predictor.bucket_bounds(0) == (0, 200)
    assert predictor.bucket_bounds(3) == (600, 800)
    for n in (1, 150, 200, 777, 2048):
        lower, upper = predictor.bucket_bounds(predictor.predict(n))
        assert lower <= n < upper


def test_same_seed_same_predictions_other_seed_other_predictions():
    lengths = [37 * i % 1500 for i in range(500)]
    a, b = OracleLengthPredictor(seed=7), OracleLengthPredictor(seed=7)
    assert [a.predict(n) for n in lengths] == [b.predict(n) for n in lengths]
    c, d = OracleLengthPredictor(seed=8), OracleLengthPredictor(seed=7)
    assert [c.predict(n) for n in lengths] != [d.predict(n) for n in lengths]


def test_keyed_predictions_do_not_depend_on_call_order():
    a, b = OracleLengthPredictor(seed=5), OracleLengthPredictor(seed=5)
    ids = list(range(300))
    forward = {i: a.predict(400 + i, request_id=i) for i in ids}
    backward = {i: b.predict(400 + i, request_id=i) for i in reversed(ids)}
    assert forward == backward
    assert sum(forward[i] != a.true_bucket(400 + i) for i in ids) > 30  # and they do err


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        OracleLengthPredictor(accuracy=1.2)
    with pytest.raises(ValueError):
        OracleLengthPredictor(bucket_size=0)
