"""Decode-length buckets as the schedulers read them, and the heavy/light split.

Bucket b covers output lengths [b * bucket_size, (b + 1) * bucket_size). The dispatcher sizes room by
the lower bound (DESIGN.md), admission reserves the upper bound (the most the prediction allows).
"""

from __future__ import annotations


def bucket_lower(bucket: int, bucket_size: int) -> int:
    return bucket * bucket_size


def bucket_upper(bucket: int, bucket_size: int) -> int:
    return (bucket + 1) * bucket_size


def is_heavy_decode(bucket: int, bucket_size: int, heavy_decode_tokens: int) -> bool:
    """Heavy when the bucket's midpoint exceeds the threshold (200-token buckets: bucket >= 1)."""
    return bucket * bucket_size + bucket_size / 2 > heavy_decode_tokens


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)
