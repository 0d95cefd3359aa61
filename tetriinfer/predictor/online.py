"""`OnlineLengthPredictor`: the prior predictor, adapted in the background to the traffic it serves.

Same interface as every `LengthPredictor` (`predict`, `submit`, `buckets`, `close`) plus
`observe(prompt_token_ids, output_len)`: a finished request's prompt and true output length, in the
served model's tokens. `observe` only queues the label; featurising it and refitting the head
(`learner.OnlineLearner`) happen on a separate learner thread, never on the request path. The head
is fitted on a copy of the buffer, outside the lock `predict` takes, and swapped in when done.

With `hidden_features` it is the probe (`predictor.probe`): the head's features are the served
model's hidden states, given with each prompt (`predict(prompts, hidden=...)`) and each label
(`observe(..., hidden=...)`); the prior still gives its candidates' probabilities and score.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from tetriinfer.predictor.learner import Featured, OnlineConfig, OnlineLearner, fit_head
from tetriinfer.predictor.probe import probe_rows
from tetriinfer.predictor.serving import LengthPrediction, LengthPredictor, ModelLengthPredictor, Prompts

log = logging.getLogger("tetriinfer.predictor")
MAX_PENDING_LABELS = 4096  # labels queued for the learner thread; beyond, the oldest are dropped

Featurizer = Callable[[Prompts], Featured]


class PriorFeaturizer:
    """Rows from a `ModelLengthPredictor`: its encoder's output and outputs (bucket logits, score) as
    features (outputs alone for a Hugging Face model), its bucket probabilities and ranking score."""

    def __init__(self, prior: ModelLengthPredictor) -> None:
        self.prior = prior

    def __call__(self, prompts: Prompts) -> Featured:
        import torch

        from tetriinfer.predictor.objectives import bucket_probs_and_scores

        prior, k = self.prior, self.prior.buckets.num_buckets
        texts = prior._texts(prompts)
        feats, probs, scores = [], [], []
        with prior._lock, torch.inference_mode():
            for start in range(0, len(texts), prior.max_batch_size):
                model = prior.model
                batch = model.collate(model.tokenize(texts[start : start + prior.max_batch_size]))
                batch = {key: v.to(prior.device) for key, v in batch.items()}
                if hasattr(model, "encoder") and hasattr(model, "head"):  # the built-in model
                    encoded = model.encoder(**batch)
                    logits = model.head(encoded)
                    feats.append(torch.cat([encoded, logits[:, : k + 1]], 1).float().cpu())
                else:
                    logits = model(**batch)
                    feats.append(logits[:, : k + 1].float().cpu())
                p, s = bucket_probs_and_scores(logits.cpu(), prior.buckets, prior.score_source)
                probs.append(p)
                scores.append(s)
        return Featured(torch.cat(feats).double().numpy(), torch.cat(probs).double().numpy(),
                        torch.cat(scores).double().numpy())


@dataclass(frozen=True)
class OnlineStats:
    """What `/metrics` shows: labels learned from, served-bucket accuracy on the recent labels,
    predictions per bucket (counter), and which candidates are served."""

    num_labels: int
    online_accuracy: float | None
    predicted_buckets: list[int]
    bucket_source: str
    score_source: str
    num_unpaired: int = 0  # the probe: labels that came without their hidden state (not learned)


class OnlineLengthPredictor(LengthPredictor):
    def __init__(self, featurize: Featurizer, prior: LengthPredictor, prior_shares: np.ndarray | None = None,
                 config: OnlineConfig = OnlineConfig(), hidden_features: bool = False) -> None:
        super().__init__(prior.buckets)
        self.prior = prior
        self.featurize = featurize
        self.hidden_features = hidden_features
        self.learner = OnlineLearner(prior.buckets, prior_shares, config)
        self.predicted = [0] * prior.buckets.num_buckets
        self.num_unpaired = 0
        self._lock = threading.Lock()  # the learner's state
        self._pending: deque[tuple[Prompts, int, np.ndarray | None]] = deque(maxlen=MAX_PENDING_LABELS)
        self._learner_pool = ThreadPoolExecutor(1, thread_name_prefix="length-learner")
        self._draining = False

    def _rows(self, prompts: Prompts, hidden: Sequence | None) -> Featured:
        rows = self.featurize(prompts)
        if not self.hidden_features:
            return rows
        if hidden is None or any(h is None for h in hidden):
            raise ValueError("the probe's features are the served model's hidden states: pass hidden=")
        return probe_rows(rows, hidden)

    def predict(self, prompts: Prompts, hidden: Sequence | None = None) -> list[LengthPrediction]:
        """`hidden`: the prompts' hidden states (the probe's features; others ignore them)."""
        rows = self._rows(prompts, hidden)
        with self._lock:
            buckets, scores = self.learner.predict(rows)
            for b in buckets:
                self.predicted[int(b)] += 1
        return [self._prediction(int(b), float(s)) for b, s in zip(buckets, scores)]

    def observe(self, prompt, output_len: int, hidden: np.ndarray | None = None) -> None:
        """Queue one label (prompt text or token ids, true output tokens, and the probe's hidden
        state); returns at once. The probe cannot learn from a label without its state: counted."""
        with self._lock:
            if self.hidden_features and hidden is None:
                self.num_unpaired += 1
                return
            self._pending.append((prompt, int(output_len), hidden))
            if self._draining:
                return
            self._draining = True
        self._learner_pool.submit(self._drain)

    def flush(self) -> None:
        """Wait until every queued label has been learned from (tests, the prequential driver)."""
        self._learner_pool.submit(lambda: None).result()

    def stats(self) -> OnlineStats:
        with self._lock:
            learner = self.learner
            return OnlineStats(learner.num_labels, learner.online_accuracy(), list(self.predicted),
                               learner.bucket_source, learner.score_source, self.num_unpaired)

    def close(self) -> None:
        super().close()
        self._learner_pool.shutdown(wait=True, cancel_futures=True)
        self.prior.close()

    def _drain(self) -> None:
        try:
            while True:
                with self._lock:
                    if not self._pending:
                        self._draining = False
                        return
                    batch = list(self._pending)
                    self._pending.clear()
                # outside the lock: predict keeps going
                rows = self._rows([p for p, _, _ in batch], [h for _, _, h in batch])
                with self._lock:
                    self.learner.observe(rows, np.array([n for _, n, _ in batch]))
                    data = self.learner.training_set() if self.learner.due() else None
                    warm = self.learner.head
                if data is not None:
                    head = fit_head(data, self.buckets, self.learner.config, warm)
                    with self._lock:
                        self.learner.head = head
        except Exception:  # noqa: BLE001 - a learner failure must not take serving down
            log.exception("online length learner failed; serving the last fitted state")
            with self._lock:
                self._draining = False


def online_predictor(prior: LengthPredictor, prior_shares: list[float] | None,
                     config: OnlineConfig = OnlineConfig(), hidden_features: bool = False) -> OnlineLengthPredictor:
    """The online form of a loaded prior: model features when it has a model, else the running
    label distribution alone (the constant fallback has no features); with `hidden_features`, the
    probe's (the served model's hidden states) instead."""
    if isinstance(prior, ModelLengthPredictor):
        featurize: Featurizer = PriorFeaturizer(prior)
    else:
        k = prior.buckets.num_buckets

        def featurize(prompts: Prompts) -> Featured:
            n = len(prompts)
            base = prior.predict(prompts)
            probs = np.zeros((n, k))
            probs[np.arange(n), [p.bucket for p in base]] = 1.0
            return Featured(np.zeros((n, 1)), probs, np.array([p.score for p in base]))

    shares = np.array(prior_shares) if prior_shares else None
    return OnlineLengthPredictor(featurize, prior, shares, config, hidden_features)
