"""The online learner replayed in the simulator: `simulate(..., predictor=ReplayPredictor(...))`.

The simulator's requests carry lengths only, so the prompts come from an example stream whose i-th
example is request i (`specs_from_examples` builds such requests). The simulator asks
`predict(output_tokens, request_id) -> bucket` when a request is placed; the learner answers from
that request's features, never from `output_tokens`. A request's label is revealed `label_lag`
predictions later (it has finished by then, roughly), in blocks of `update_every`, and the head is
refitted when due: the serving protocol, in simulated order.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from tetriinfer.predictor.learner import Featured, OnlineConfig, OnlineLearner
from tetriinfer.sched.lengths import BucketSpec


class ReplayPredictor:
    def __init__(self, rows: Featured, tokens: np.ndarray, spec: BucketSpec, update_every: int = 50,
                 label_lag: int = 32, prior_shares: np.ndarray | None = None, learn: bool = True) -> None:
        """`learn` False: the prior alone (the same features, no labels)."""
        self.rows, self.tokens, self.spec = rows, np.asarray(tokens), spec
        self.learner = OnlineLearner(spec, prior_shares, OnlineConfig(refit_every=update_every))
        self.update_every, self.label_lag, self.learn = update_every, label_lag, learn
        self.buckets = spec  # the simulator reads bucket bounds through bucket_bounds()
        self._finished: deque[int] = deque()
        self._ready: list[int] = []
        self.predicted: dict[int, int] = {}

    def predict(self, output_tokens: int, request_id: int) -> int:
        del output_tokens  # the learner never peeks at the answer
        row = self.rows.row(request_id)
        if self.learn:
            bucket = int(self.learner.predict(row)[0][0])
        else:
            bucket = int(row.probs.argmax(1)[0])
        self.predicted[request_id] = bucket
        self._finished.append(request_id)
        if self.learn and len(self._finished) > self.label_lag:
            self._ready.append(self._finished.popleft())
            if len(self._ready) >= self.update_every:
                self._reveal()
        return bucket

    def bucket_bounds(self, bucket: int) -> tuple[int, int]:
        return self.spec.lower(bucket), self.spec.upper(bucket)

    def accuracy(self) -> float:
        ids = list(self.predicted)
        return float(np.mean([self.predicted[i] == self.spec.bucket_of(int(self.tokens[i])) for i in ids]))

    def _reveal(self) -> None:
        ids = np.array(self._ready)
        self._ready = []
        part = Featured(self.rows.features[ids], self.rows.probs[ids], self.rows.score[ids])
        self.learner.observe(part, self.tokens[ids])
        if self.learner.due():
            self.learner.fit()


def specs_from_examples(prompt_tokens: np.ndarray, output_tokens: np.ndarray, rate: float, seed: int = 0) -> list:
    """Simulator requests for an example stream, in order, with Poisson arrivals at `rate` per second."""
    from tetriinfer.bench.workload import RequestSpec

    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, len(output_tokens)))
    return [RequestSpec(i, float(arrivals[i]), max(1, int(p)), max(1, int(o)))
            for i, (p, o) in enumerate(zip(prompt_tokens, output_tokens))]
