"""The online learner replayed in the simulator (predictor.sim_replay)."""

import numpy as np

from tetriinfer.config import ClusterConfig, SimConfig
from tetriinfer.predictor.learner import Featured
from tetriinfer.predictor.sim_replay import ReplayPredictor, specs_from_examples
from tetriinfer.sched.lengths import BucketSpec
from tetriinfer.sim.cluster import simulate
from tetriinfer.sim.cost import RooflineCostModel

SPEC = BucketSpec(200, 6)


def _rows(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 1300, n)
    features = np.column_stack([np.log(tokens) + rng.normal(scale=0.1, size=n), rng.normal(size=n)])
    probs = np.full((n, 6), 0.05)
    probs[:, 4] = 0.75  # a prior that believes every reply is long
    return Featured(features, probs, np.zeros(n)), tokens


def test_replay_never_reads_the_true_length_and_learns_with_a_lag():
    rows, tokens = _rows(600)
    a = ReplayPredictor(rows, tokens, SPEC, update_every=25, label_lag=40)
    b = ReplayPredictor(rows, tokens, SPEC, update_every=25, label_lag=40)
    assert [a.predict(int(t), i) for i, t in enumerate(tokens)] == [b.predict(0, i) for i in range(len(tokens))]
    assert a.learner.num_labels == (600 - 40) // 25 * 25  # only labels `label_lag` predictions old
    prior = ReplayPredictor(rows, tokens, SPEC, learn=False)
    for i, t in enumerate(tokens):
        prior.predict(int(t), i)
    assert prior.accuracy() < 0.2 and a.accuracy() > prior.accuracy() + 0.2


def test_simulate_takes_the_replayed_learner_in_place_of_the_oracle():
    rows, tokens = _rows(120, seed=1)
    specs = specs_from_examples(np.full(120, 300), tokens, rate=20.0)
    replay = ReplayPredictor(rows, tokens, SPEC, update_every=20, label_lag=10)
    result = simulate(specs, SimConfig(ClusterConfig(system="tetriinfer")),
                      RooflineCostModel.from_names("h100", "llama3-8b", 1), predictor=replay)
    assert len(result.requests) == 120 and len(replay.predicted) == 120
    assert all(r.output_tokens == t for r, t in zip(sorted(result.requests, key=lambda r: r.request_id), tokens))
