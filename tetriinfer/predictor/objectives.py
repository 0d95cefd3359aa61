"""What a length model is trained to output, and how its outputs become predictions.

Model outputs are [batch, num_buckets + 1]: bucket logits, then a ranking score.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tetriinfer.sched.lengths import BucketSpec

if TYPE_CHECKING:
    from tetriinfer.predictor.config import TrainConfig


def bucket_probs_and_scores(
    logits: torch.Tensor, buckets: BucketSpec, score_source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket probabilities [B, K] and ranking scores [B] from model outputs [B, K + 1].

    `score_source` (`artifact.SCORE_SOURCES`): `head`, the score output; `expected`, the expected
    bucket midpoint under the bucket probabilities; `expected_log_length`, the expected log of the
    midpoint (sum_b p_b log midpoint_b; the open last bucket's midpoint is its lower bound plus half a
    bucket, as `BucketSpec.midpoint` says), which weighs a few points of probability on the long
    buckets less than `expected` does.
    """
    probs = logits[:, : buckets.num_buckets].float().softmax(-1)
    if score_source == "head":
        return probs, logits[:, buckets.num_buckets].float()
    mids = torch.tensor([buckets.midpoint(b) for b in range(buckets.num_buckets)], device=logits.device)
    if score_source == "expected_log_length":
        return probs, probs @ mids.log()
    if score_source != "expected":
        raise ValueError(f"unknown score source {score_source!r}")
    return probs, probs @ mids


def pairwise_rank_loss(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """RankNet: -log sigmoid(s_i - s_j) over every pair in the batch whose reply i is longer than j."""
    longer = tokens[:, None] > tokens[None, :]
    if not longer.any():
        return scores.sum() * 0.0
    return F.softplus(scores[None, :] - scores[:, None])[longer].mean()


def length_loss(
    logits: torch.Tensor, buckets_true: torch.Tensor, tokens: torch.Tensor, num_buckets: int, cfg: TrainConfig
) -> torch.Tensor:
    loss = logits.sum() * 0.0
    if cfg.loss in ("ce", "ce+rank"):
        loss = loss + F.cross_entropy(logits[:, :num_buckets], buckets_true)
    if cfg.loss in ("rank", "ce+rank"):
        loss = loss + cfg.rank_weight * pairwise_rank_loss(logits[:, num_buckets], tokens.float())
    return loss
