"""Decode-length buckets: fixed-width token ranges, the last one open-ended.

The paper predicts the decode length in 200-token buckets and sizes resources by the bucket's
lower bound; the last bucket collects every longer reply, so its upper bound is the generation cap.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BucketSpec:
    """Bucket b holds lengths [b * granularity, (b + 1) * granularity); the last is [.., max_output_tokens]."""

    granularity: int = 200
    num_buckets: int = 6
    max_output_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.granularity < 1:
            raise ValueError(f"granularity must be >= 1, got {self.granularity}")
        if self.num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {self.num_buckets}")
        if self.max_output_tokens < self.granularity * (self.num_buckets - 1):
            raise ValueError("max_output_tokens must reach past the start of the last bucket")

    @classmethod
    def covering(cls, granularity: int, open_from: int = 1000, max_output_tokens: int = 4096) -> "BucketSpec":
        """Buckets of `granularity` tokens up to `open_from`; the last starts at or after `open_from`."""
        return cls(granularity, -(-open_from // granularity) + 1, max_output_tokens)

    def bucket_of(self, tokens: int) -> int:
        return min(max(tokens, 0) // self.granularity, self.num_buckets - 1)

    def lower(self, bucket: int) -> int:
        return bucket * self.granularity

    def upper(self, bucket: int) -> int:
        if bucket == self.num_buckets - 1:
            return self.max_output_tokens
        return (bucket + 1) * self.granularity

    def midpoint(self, bucket: int) -> float:
        """Point estimate used for MAE; the open last bucket counts as one granularity wide."""
        return self.lower(bucket) + self.granularity / 2
