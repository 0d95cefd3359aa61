"""Length-prediction metrics: bucket accuracy, the majority baseline, MAE, Kendall's tau-b."""

from __future__ import annotations

import numpy as np


def accuracy(predicted: np.ndarray, actual: np.ndarray) -> float:
    return float(np.mean(np.asarray(predicted) == np.asarray(actual)))


def majority_bucket(train_buckets: np.ndarray, num_buckets: int) -> int:
    return int(np.bincount(np.asarray(train_buckets), minlength=num_buckets).argmax())


def mean_absolute_error(estimates: np.ndarray, actual_tokens: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(estimates, float) - np.asarray(actual_tokens, float))))


def _tied_pairs(values: np.ndarray) -> int:
    _, counts = np.unique(values, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def kendall_tau_b(x: np.ndarray, y: np.ndarray, block: int = 512) -> float:
    """Kendall's tau-b (ties in either variable corrected), exact, O(n^2) in row blocks.

    Returns nan when either variable is constant (a constant predictor has no ranking).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be 1-D arrays of the same length")
    n = len(x)
    total = n * (n - 1) // 2
    denom = np.sqrt(float(total - _tied_pairs(x)) * float(total - _tied_pairs(y)))
    if denom == 0:
        return float("nan")
    s = 0
    for start in range(0, n, block):
        dx = np.sign(x[start : start + block, None] - x[None, :]).astype(np.int8)
        dy = np.sign(y[start : start + block, None] - y[None, :]).astype(np.int8)
        s += int((dx * dy).sum(dtype=np.int64))
    return float(s / 2 / denom)  # every unordered pair was counted twice
