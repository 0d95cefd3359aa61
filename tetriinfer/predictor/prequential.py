"""The prequential protocol: predict each example of a stream before its label is revealed, learn
from the labels every `update_every` examples, and score the predictions made along the way.

Reported over the stream (and over its part after `warmup` examples): bucket accuracy, Kendall's
tau-b, MAE; the same for the stream's own *running* majority (the majority bucket of the labels
revealed so far, the best a learner without features can do); and how many examples it took
until the learner's accuracy stayed above that running majority's (cumulatively, to the end).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tetriinfer.predictor.learner import Featured, OnlineConfig, OnlineLearner
from tetriinfer.predictor.metrics import accuracy, kendall_tau_b, mean_absolute_error
from tetriinfer.sched.lengths import BucketSpec


@dataclass
class StreamReport:
    examples: int
    update_every: int  # 0: the prior alone, no learning
    accuracy: float
    majority_accuracy: float  # the stream's running majority, predicted before each label
    kendall_tau: float
    mae_tokens: float
    majority_mae_tokens: float
    after: int  # the `_after` numbers cover examples [after, end)
    accuracy_after: float | None
    majority_accuracy_after: float | None
    kendall_tau_after: float | None
    mae_tokens_after: float | None
    passes_majority_at: int | None  # from here on, cumulative accuracy stays above the running majority's
    final_bucket_source: str
    final_score_source: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class StreamPredictions:
    buckets: np.ndarray
    scores: np.ndarray
    majority: np.ndarray  # the running majority before each label
    bucket_source: str
    score_source: str


def run_stream(rows: Featured, tokens: np.ndarray, spec: BucketSpec, update_every: int,
               prior_shares: np.ndarray | None = None, config: OnlineConfig = OnlineConfig()) -> StreamPredictions:
    """Predict rows in blocks of `update_every` (0: the prior alone), then reveal the block's labels;
    the head is refitted when the learner says it is due."""
    n = len(tokens)
    learner = OnlineLearner(spec, prior_shares, config)
    buckets, scores, majority = np.zeros(n, int), np.zeros(n), np.zeros(n, int)
    counts = np.zeros(spec.num_buckets)
    block = update_every or n
    for start in range(0, n, block):
        idx = slice(start, min(start + block, n))
        part = Featured(rows.features[idx], rows.probs[idx], rows.score[idx])
        if update_every:
            buckets[idx], scores[idx] = learner.predict(part)
        else:
            buckets[idx], scores[idx] = part.probs.argmax(1), part.score
        for i in range(idx.start, idx.stop):  # the running majority updates per label
            majority[i] = int(counts.argmax()) if counts.any() else int(part.probs.mean(0).argmax())
            counts[spec.bucket_of(int(tokens[i]))] += 1
        if update_every:
            learner.observe(part, tokens[idx])
            if learner.due():
                learner.fit()
    return StreamPredictions(buckets, scores, majority, learner.bucket_source, learner.score_source)


def passes_majority_at(correct: np.ndarray, majority_correct: np.ndarray, min_examples: int = 20) -> int | None:
    """The first n (>= min_examples) from which the cumulative accuracy is above the majority's for good."""
    lead = np.cumsum(correct.astype(int) - majority_correct.astype(int))
    if len(lead) == 0 or lead[-1] <= 0:
        return None
    below = np.nonzero(lead <= 0)[0]
    first = int(below[-1]) + 2 if len(below) else 1
    return max(first, min_examples)


def score_stream(pred: StreamPredictions, tokens: np.ndarray, spec: BucketSpec, update_every: int,
                 after: int = 500) -> StreamReport:
    true = np.array([spec.bucket_of(int(t)) for t in tokens])
    mids = np.array([spec.midpoint(int(b)) for b in pred.buckets])
    maj_mids = np.array([spec.midpoint(int(b)) for b in pred.majority])
    tail = slice(after, None) if len(tokens) > after + 20 else None

    def part(fn, *arrays):
        return None if tail is None else fn(*(a[tail] for a in arrays))

    return StreamReport(
        examples=len(tokens), update_every=update_every,
        accuracy=accuracy(pred.buckets, true), majority_accuracy=accuracy(pred.majority, true),
        kendall_tau=kendall_tau_b(pred.scores, tokens), mae_tokens=mean_absolute_error(mids, tokens),
        majority_mae_tokens=mean_absolute_error(maj_mids, tokens), after=after,
        accuracy_after=part(accuracy, pred.buckets, true), majority_accuracy_after=part(accuracy, pred.majority, true),
        kendall_tau_after=part(kendall_tau_b, pred.scores, tokens), mae_tokens_after=part(mean_absolute_error, mids, tokens),
        passes_majority_at=passes_majority_at(pred.buckets == true, pred.majority == true),
        final_bucket_source=pred.bucket_source if update_every else "prior",
        final_score_source=pred.score_source if update_every else "prior",
    )


def featurize_all(featurize, prompts: list[str], batch_size: int = 64) -> Featured:
    parts = [featurize(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    return Featured(np.concatenate([p.features for p in parts]), np.concatenate([p.probs for p in parts]),
                    np.concatenate([p.score for p in parts]))


def evaluate_stream(model_dir, examples, update_every: int, probe_dir: str | None = None,
                    after: int = 500) -> StreamReport:
    """`predictor eval --online N`: the prior in `model_dir` (None: the shipped one) adapted online
    over `examples` in file order; with `probe_dir`, the head reads that causal LM's hidden state."""
    from pathlib import Path

    from tetriinfer.predictor.artifact import DEFAULT_DIR, read_meta
    from tetriinfer.predictor.online import PriorFeaturizer
    from tetriinfer.predictor.serving import load_predictor
    from tetriinfer.predictor.tokenizer import load_tokenizer
    from tetriinfer.predictor.train import label_tokens

    model_dir = Path(model_dir) if model_dir is not None else DEFAULT_DIR
    meta = read_meta(model_dir)
    prior = load_predictor(model_dir)
    tokens = label_tokens(examples, load_tokenizer(model_dir / meta.label_tokenizer))
    prompts = [ex.prompt for ex in examples]
    featurize = PriorFeaturizer(prior)
    if probe_dir is not None:
        from tetriinfer.predictor.probe import HiddenStateProbe

        featurize = HiddenStateProbe.from_pretrained(probe_dir, featurize)
    rows = featurize_all(featurize, prompts)
    shares = meta.training.get("label_shares")
    config = OnlineConfig(refit_every=max(update_every, 1))
    pred = run_stream(rows, tokens, meta.buckets, update_every, np.array(shares) if shares else None, config)
    return score_stream(pred, tokens, meta.buckets, update_every, after)
