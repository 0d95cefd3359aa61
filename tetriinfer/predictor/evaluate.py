"""Evaluating a predictor directory on an example file: accuracy, baseline, MAE, tau, latency."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tetriinfer.predictor.artifact import DEFAULT_DIR, read_meta
from tetriinfer.predictor.examples import LengthExample
from tetriinfer.predictor.metrics import accuracy, kendall_tau_b, mean_absolute_error
from tetriinfer.predictor.serving import load_predictor
from tetriinfer.predictor.tokenizer import load_tokenizer
from tetriinfer.predictor.train import label_tokens


@dataclass
class EvalReport:
    """`kendall_tau` ranks by the score; `kendall_tau_bucket` by the predicted bucket alone (many ties).

    Bucket metrics are None for a `rank`-only model (its bucket logits are untrained).
    """

    examples: int
    granularity: int
    accuracy: float | None
    majority_accuracy: float
    mae_tokens: float | None
    majority_mae_tokens: float
    kendall_tau: float
    kendall_tau_bucket: float | None
    latency_ms_per_prompt_batched: float
    latency_ms_single_prompt: float
    batch_size: int
    device: str
    label_bucket_shares: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model_dir: str | Path | None,
    examples: list[LengthExample],
    batch_size: int = 32,
    single_prompt_runs: int = 50,
    device: str = "cpu",
) -> EvalReport:
    model_dir = Path(model_dir) if model_dir is not None else DEFAULT_DIR
    meta = read_meta(model_dir)
    spec = meta.buckets
    predictor = load_predictor(model_dir, device=device)
    tokens = label_tokens(examples, load_tokenizer(model_dir / meta.label_tokenizer))
    true_buckets = np.array([spec.bucket_of(int(t)) for t in tokens])

    predictions, batch_seconds = [], 0.0
    for start in tqdm(range(0, len(examples), batch_size), desc="predict", unit="batch", leave=False):
        batch = [ex.prompt for ex in examples[start : start + batch_size]]
        t0 = time.perf_counter()
        predictions += predictor.predict(batch)
        batch_seconds += time.perf_counter() - t0
    single = []
    for ex in examples[:single_prompt_runs]:
        t0 = time.perf_counter()
        predictor.predict([ex.prompt])
        single.append(time.perf_counter() - t0)

    predicted = np.array([p.bucket for p in predictions])
    scores = np.array([p.score for p in predictions])
    has_buckets = meta.training.get("config", {}).get("loss") != "rank"
    majority = np.full(len(tokens), meta.majority_bucket)
    return EvalReport(
        examples=len(examples),
        granularity=spec.granularity,
        accuracy=accuracy(predicted, true_buckets) if has_buckets else None,
        majority_accuracy=accuracy(majority, true_buckets),
        mae_tokens=mean_absolute_error([spec.midpoint(b) for b in predicted], tokens) if has_buckets else None,
        majority_mae_tokens=mean_absolute_error([spec.midpoint(meta.majority_bucket)] * len(tokens), tokens),
        kendall_tau=kendall_tau_b(scores, tokens),
        kendall_tau_bucket=kendall_tau_b(predicted, tokens) if has_buckets else None,
        latency_ms_per_prompt_batched=1000 * batch_seconds / len(examples),
        latency_ms_single_prompt=1000 * statistics.median(single),
        batch_size=batch_size,
        device=device,
        label_bucket_shares=(np.bincount(true_buckets, minlength=spec.num_buckets) / len(tokens)).round(4).tolist(),
    )
