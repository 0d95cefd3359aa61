"""Online adaptation: the learner, the background predictor, the prequential protocol and its CLI."""

import json
import time

import numpy as np
import pytest

from tetriinfer.predictor import load_predictor
from tetriinfer.predictor.learner import Featured, OnlineConfig, OnlineLearner
from tetriinfer.predictor.online import OnlineLengthPredictor
from tetriinfer.predictor.prequential import passes_majority_at, run_stream, score_stream
from tetriinfer.sched.lengths import BucketSpec

SPEC = BucketSpec(200, 6)


def _stream(n: int, seed: int, informative: bool = True, prior_bucket: int = 1):
    """Lengths log-uniform in 20..1500; the first feature carries log length (or noise); the prior
    always says `prior_bucket` with a score that knows nothing."""
    rng = np.random.default_rng(seed)
    tokens = np.exp(rng.uniform(np.log(20), np.log(1500), n)).astype(int)
    signal = np.log(tokens) if informative else rng.normal(size=n)
    features = np.column_stack([signal + rng.normal(scale=0.3, size=n), rng.normal(size=(n, 3))])
    probs = np.full((n, 6), 0.02)
    probs[:, prior_bucket] = 0.9
    return Featured(features, probs, rng.normal(size=n)), tokens


def test_learner_on_informative_features_beats_the_running_majority_and_ranks():
    rows, tokens = _stream(1500, 0)
    report = score_stream(run_stream(rows, tokens, SPEC, 50), tokens, SPEC, 50)
    assert report.accuracy_after > report.majority_accuracy_after + 0.1
    assert report.kendall_tau_after > 0.6
    assert report.mae_tokens_after < report.majority_mae_tokens
    assert report.passes_majority_at is not None and report.passes_majority_at < 500
    assert report.final_bucket_source in ("head", "regress", "recent") and report.final_score_source == "head"


def test_learner_without_signal_is_never_much_worse_than_the_majority():
    rows, tokens = _stream(1500, 1, informative=False, prior_bucket=5)  # a prior that is badly wrong
    learned = score_stream(run_stream(rows, tokens, SPEC, 50), tokens, SPEC, 50)
    prior = score_stream(run_stream(rows, tokens, SPEC, 0), tokens, SPEC, 0)
    assert prior.accuracy < 0.2  # the prior alone is far below the majority
    assert learned.accuracy_after >= learned.majority_accuracy_after - 0.03


def test_label_shift_moves_the_served_bucket_within_a_few_labels():
    learner = OnlineLearner(SPEC, np.array([0.1, 0.6, 0.2, 0.05, 0.03, 0.02]))
    rows, _ = _stream(40, 2)
    rows.probs[:] = [0.3, 0.4, 0.2, 0.05, 0.03, 0.02]  # the prior leans to bucket 1, unsure
    assert set(learner.predict(rows)[0]) == {1}
    learner.observe(rows, np.full(40, 50))  # every reply is short
    assert set(learner.predict(rows)[0]) == {0}
    assert learner.bucket_source in ("majority", "shifted")
    assert learner.online_accuracy() is not None


def test_passes_majority_at_is_where_the_lead_stays_positive():
    correct = np.array([0, 0, 1, 1, 1, 1] * 10, bool)
    majority = np.array([1, 1, 0, 0, 1, 0] * 10, bool)
    at = passes_majority_at(correct, majority, min_examples=1)
    lead = np.cumsum(correct.astype(int) - majority.astype(int))
    assert (lead[at - 1 :] > 0).all() and lead[at - 2] <= 0
    assert passes_majority_at(majority, correct) is None  # never ahead at the end


class _Featurizer:
    """Prompts are strings 'n' of the true length: the feature is its log (perfectly informative)."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s

    def __call__(self, prompts):
        time.sleep(self.delay_s)
        x = np.log1p(np.array([float(p) for p in prompts]))[:, None]
        probs = np.full((len(prompts), 6), 1 / 6)
        return Featured(x, probs, np.zeros(len(prompts)))


def test_observe_returns_at_once_and_the_predictor_learns_in_the_background():
    prior = load_predictor("none")
    predictor = OnlineLengthPredictor(_Featurizer(delay_s=0.2), prior, config=OnlineConfig(refit_every=16,
                                                                                           min_fit_examples=16))
    rng = np.random.default_rng(3)
    lengths = rng.integers(10, 1200, 200)
    t0 = time.perf_counter()
    for n in lengths:
        predictor.observe(str(n), int(n))
    assert time.perf_counter() - t0 < 0.15  # the featurizer's 0.2 s is the learner thread's, not ours
    predictor.flush()
    assert predictor.stats().bucket_source not in ("head", "regress", "recent")  # fitted, but not yet proven on labels it had not seen
    for n in lengths:
        predictor.observe(str(n + 1), int(n + 1))
    predictor.flush()
    stats = predictor.stats()
    assert stats.num_labels == 400 and stats.online_accuracy is not None and stats.bucket_source in ("head", "regress", "recent")
    predictions = predictor.predict(["50", "700", "1100"])
    assert [p.bucket for p in predictions] == [0, 3, 5]
    assert predictions[0].score < predictions[1].score < predictions[2].score
    assert sum(predictor.stats().predicted_buckets) == 3
    predictor.close()


def test_load_predictor_is_online_when_asked_and_static_turns_it_off():
    online = load_predictor(online=True)
    assert isinstance(online, OnlineLengthPredictor)
    assert not isinstance(load_predictor("static", online=True), OnlineLengthPredictor)
    static = load_predictor()
    static.observe([1, 2], 30)  # a static predictor accepts labels and ignores them
    prompts = ["USER: hi\n", "USER: write a long essay on tides\n"]
    assert [p.bucket for p in online.predict(prompts)] == [p.bucket for p in static.predict(prompts)]
    online.close()


def test_eval_online_cli_reports_the_stream_against_its_running_majority(tmp_path):
    from tetriinfer.cli import main

    data = tmp_path / "stream.jsonl"
    rng = np.random.default_rng(4)
    rows = [{"prompt": f"USER: please answer {'briefly' if i % 2 else 'in a long detailed essay'}\n",
             "output_tokens": int(rng.integers(10, 150) if i % 2 else rng.integers(650, 900))} for i in range(240)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report.json"
    assert main(["predictor", "eval", "--data", str(data), "--online", "20", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["examples"] == 240 and report["update_every"] == 20 and report["model"] == "default"
    assert report["accuracy"] > report["majority_accuracy"] + 0.2
    assert report["kendall_tau"] > 0.3  # two prompts: most pairs tie in any score


def test_prepare_reads_tetriinfer_data_dir_and_names_what_is_missing(tmp_path, monkeypatch):
    from tetriinfer.predictor.cli import data_root

    monkeypatch.setenv("TETRIINFER_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match=f"{tmp_path} lacks sharegpt-v3-partial, alpaca-eval, gsm8k"):
        data_root(None)
    for name in ("sharegpt-v3-partial", "alpaca-eval", "gsm8k"):
        (tmp_path / name).mkdir()
    assert data_root(None) == tmp_path
    with pytest.raises(SystemExit, match="x lacks"):
        data_root(str(tmp_path / "x"))  # the flag wins over the variable
