"""Decode-length buckets, the one definition every layer uses (the predictor that outputs them, the
simulator's oracle, the schedulers that read them), and the heavy/light split.

Bucket b covers output lengths [b * granularity, (b + 1) * granularity). A classifier has a fixed
number of buckets and its last one is open-ended: it holds every longer reply, so its upper bound is
the generation cap. The dispatcher sizes room by the lower bound (DESIGN.md); admission reserves the
upper bound (the most the prediction allows).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BucketSpec:
    """`num_buckets` None: unbounded, every bucket its nominal width (the simulator's oracle)."""

    granularity: int = 200
    num_buckets: int | None = 6
    max_output_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.granularity < 1:
            raise ValueError(f"granularity must be >= 1, got {self.granularity}")
        if self.num_buckets is not None:
            if self.num_buckets < 1:
                raise ValueError(f"num_buckets must be >= 1, got {self.num_buckets}")
            if self.max_output_tokens < self.granularity * (self.num_buckets - 1):
                raise ValueError("max_output_tokens must reach past the start of the last bucket")

    @classmethod
    def covering(cls, granularity: int, open_from: int = 1000, max_output_tokens: int = 4096) -> "BucketSpec":
        """Buckets of `granularity` tokens up to `open_from`; the last starts at or after `open_from`."""
        return cls(granularity, -(-open_from // granularity) + 1, max_output_tokens)

    def bucket_of(self, tokens: int) -> int:
        bucket = max(tokens, 0) // self.granularity
        return bucket if self.num_buckets is None else min(bucket, self.num_buckets - 1)

    def lower(self, bucket: int) -> int:
        return bucket * self.granularity

    def upper(self, bucket: int) -> int:
        if self.num_buckets is not None and bucket == self.num_buckets - 1:
            return self.max_output_tokens
        return (bucket + 1) * self.granularity

    def midpoint(self, bucket: int) -> float:
        """Point estimate (MAE, the heavy/light split); the open last bucket counts as one granularity wide."""
        return self.lower(bucket) + self.granularity / 2


def is_heavy_decode(bucket: int, bucket_size: int, heavy_decode_tokens: int) -> bool:
    """Heavy when the bucket's midpoint exceeds the threshold (200-token buckets: bucket >= 1)."""
    return BucketSpec(bucket_size, None).midpoint(bucket) > heavy_decode_tokens


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def placement_blocks(prompt_tokens: int, lower: int, upper: int, block_size: int, capacity_blocks: int) -> tuple[int, int]:
    """(need, reserve) KV blocks of a prefilled request predicted to output [lower, upper) tokens:
    the dispatcher places by the lower bound (at least one token), admission reserves the upper;
    both capped at the instance's capacity so a long prediction never blocks a request for good."""
    need = min(blocks_for(prompt_tokens + max(lower, 1), block_size), capacity_blocks)
    reserve = min(blocks_for(prompt_tokens + max(upper, 1), block_size), capacity_blocks)
    return need, reserve
