"""The simulator's decode-length predictor: knows the true length, errs at a set rate.

The paper's predictor (OPT-125M classifier over 200-token buckets) is right 74.9% of the time, and a
classifier over ordered buckets errs mostly into the neighbouring bucket. This oracle reproduces that:
the true bucket with probability `accuracy`, otherwise a bucket `k` away with probability falling
geometrically in `k` (`neighbour_share` of the errors land next door), either side with equal odds,
reflected back when one side does not exist. Predictions keyed by request id do not depend on the
order of calls, so every system in a comparison sees the same prediction for the same request.
"""

from __future__ import annotations

import random

from tetriinfer.config import PolicyConfig
from tetriinfer.sched.lengths import BucketSpec


class OracleLengthPredictor:
    def __init__(
        self,
        accuracy: float = PolicyConfig.predictor_accuracy,
        bucket_size: int = PolicyConfig.bucket_size,
        seed: int = 0,
        num_buckets: int | None = None,
        neighbour_share: float = 0.75,
    ) -> None:
        """`num_buckets`: the classifier's classes, the last one open-ended (None: unbounded)."""
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        if num_buckets is not None and num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        if not 0.0 < neighbour_share <= 1.0:
            raise ValueError(f"neighbour_share must be in (0, 1], got {neighbour_share}")
        self.accuracy = accuracy
        self.bucket_size = bucket_size
        self.buckets = BucketSpec(bucket_size, None)  # bounds at nominal width, also for a last bucket
        self.seed = seed
        self.num_buckets = num_buckets
        self.neighbour_share = neighbour_share
        self._rng = random.Random(seed)

    def true_bucket(self, output_tokens: int) -> int:
        bucket = output_tokens // self.bucket_size
        return bucket if self.num_buckets is None else min(bucket, self.num_buckets - 1)

    def predict(self, output_tokens: int, request_id: int | None = None) -> int:
        """The predicted bucket of a request that will generate `output_tokens` tokens.

        With `request_id`, the draw is a function of (seed, request_id) alone; without it, draws come
        in call order from one generator seeded with `seed`.
        """
        rng = self._rng if request_id is None else random.Random(f"{self.seed}:{request_id}")
        truth = self.true_bucket(output_tokens)
        if rng.random() < self.accuracy:
            return truth
        distance = 1
        while rng.random() >= self.neighbour_share:
            distance += 1
        sign = 1 if rng.random() < 0.5 else -1
        return self._wrong_bucket(truth, sign * distance)

    def bucket_bounds(self, bucket: int) -> tuple[int, int]:
        """Output lengths [lower, upper) bucket `bucket` stands for; the last bucket of a bounded
        classifier still reports its nominal width."""
        return self.buckets.lower(bucket), self.buckets.upper(bucket)

    def _wrong_bucket(self, truth: int, offset: int) -> int:
        top = self.num_buckets - 1 if self.num_buckets is not None else None
        if top == 0:
            return 0  # a one-bucket classifier cannot be wrong
        guess = truth + offset
        if guess < 0 or (top is not None and guess > top):
            guess = truth - offset  # the other side of the truth
        guess = max(guess, 0) if top is None else min(max(guess, 0), top)
        if guess == truth:  # both sides ran out: the nearest bucket that exists
            guess = truth + 1 if top is None or truth < top else truth - 1
        return guess
