"""The online length learner: what adapts a prior predictor to the traffic it serves.

Synchronous and thread-free (`online.OnlineLengthPredictor` runs it in the background when
serving; `prequential.py` drives it directly). It sees each request as a `Featured` row: a feature
vector (the prior model's encoder output and bucket logits, or a served model's hidden state), the
prior's bucket probabilities and ranking score. It keeps a bounded buffer of labelled rows and
several candidate predictors, and serves, for buckets and for the score separately, the one that did
best on the most recent labels (each scored on a label *before* it joined the training set):

- `majority`: the running majority bucket of the labels seen so far;
- `prior`: the prior model as shipped;
- `shifted`: the prior corrected for label shift (its probabilities times running label shares over
  its training shares), the blend that works from the first few labels;
- `head`: a softmax regression (buckets) and a ridge regression on log length (score) over the
  features, refitted on the buffer; the ridge's strength is picked by exact leave-one-out error;
- `regress`: the bucket most likely under the ridge's log-length estimate with its leave-one-out
  spread (a normal in log tokens): fewer parameters than the softmax, so better on few labels;
- `recent`: the same ridge fitted on the newest `recent_labels` only, which follows a switch of
  traffic faster than a head fitted on the whole buffer.
`majority` and `shifted` read the label shares of the last `window` labels, for the same reason.

Choosing by recent accuracy is what keeps it from ever being much worse than the traffic's own
majority bucket: that is one of the candidates.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tetriinfer.predictor.metrics import kendall_tau_b
from tetriinfer.sched.lengths import BucketSpec

BUCKET_CANDIDATES = ("majority", "prior", "shifted", "regress", "recent", "head")
SCORE_CANDIDATES = ("prior", "head", "recent")
FITTED = ("regress", "recent", "head")
RIDGE_STRENGTHS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # per example, on standardised features
_erf = np.vectorize(math.erf, otypes=[float])
SCORE_SWITCH_MARGIN = 0.03  # Kendall's tau the head must gain over the prior's score to serve it


@dataclass(frozen=True)
class OnlineConfig:
    buffer_size: int = 4096  # labelled examples kept (the newest)
    refit_every: int = 32  # labels between refits of the head
    min_fit_examples: int = 32  # the head is not fitted (nor chosen) before this many labels
    window: int = 256  # recent labels on which candidates are compared (and label shares counted)
    recent_labels: int = 512  # the `recent` ridge's training labels
    l2: float = 1e-2  # weight decay of the bucket head and the ridge score
    fit_steps: int = 40  # L-BFGS iterations per refit (warm-started)
    prior_pseudo_labels: float = 8.0  # the running label shares start as the prior's, this many labels' worth

    def __post_init__(self) -> None:
        if min(self.buffer_size, self.refit_every, self.min_fit_examples, self.window, self.fit_steps) < 1:
            raise ValueError("OnlineConfig sizes must be >= 1")


@dataclass
class Featured:
    """Rows to predict or learn from: features [n, d], prior bucket probabilities [n, K], prior scores [n]."""

    features: np.ndarray
    probs: np.ndarray
    score: np.ndarray

    def row(self, i: int) -> "Featured":
        return Featured(self.features[i : i + 1], self.probs[i : i + 1], self.score[i : i + 1])


@dataclass
class Head:
    """A fitted head: standardisation, softmax weights [d + 1, K], ridge weights [d + 1], and the
    prior's score mapped linearly to log length (`prior_w`: slope, intercept), so every served score
    is on one scale (log tokens) whichever candidate serves it: queues compare scores across refits."""

    mean: np.ndarray
    std: np.ndarray
    bucket_w: np.ndarray
    score_w: np.ndarray
    prior_w: tuple[float, float] = (1.0, 0.0)
    sigma: float = 1.0  # leave-one-out RMS error of the ridge, in log tokens
    edges: np.ndarray = field(default_factory=lambda: np.zeros(0))  # log1p of the bucket bounds
    recent_w: np.ndarray | None = None  # the ridge on the newest labels only, and its LOO error
    recent_sigma: float = 1.0

    def recent_score(self, features: np.ndarray) -> np.ndarray:
        return self.design(features) @ (self.score_w if self.recent_w is None else self.recent_w)

    def regress_probs(self, features: np.ndarray, recent: bool = False) -> np.ndarray:
        mu = self.recent_score(features) if recent else self.score(features)
        z = (self.edges[None, :] - mu[:, None]) / (self.recent_sigma if recent else self.sigma)
        cdf = 0.5 * (1 + _erf(z / math.sqrt(2)))
        return np.diff(np.hstack([np.zeros((len(z), 1)), cdf, np.ones((len(z), 1))]), axis=1)

    def prior_score(self, score: np.ndarray) -> np.ndarray:
        return self.prior_w[0] * np.asarray(score, float) + self.prior_w[1]

    def design(self, features: np.ndarray) -> np.ndarray:
        x = (features - self.mean) / self.std
        return np.hstack([x, np.ones((len(x), 1))])

    def probs(self, features: np.ndarray) -> np.ndarray:
        z = self.design(features) @ self.bucket_w
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def score(self, features: np.ndarray) -> np.ndarray:
        return self.design(features) @ self.score_w


@dataclass
class TrainingSet:
    features: np.ndarray
    tokens: np.ndarray
    buckets: np.ndarray
    prior_score: np.ndarray


@dataclass
class _Recent:
    """Per candidate, its prediction for each of the last `window` labels, made before the label."""

    buckets: dict[str, deque] = field(default_factory=dict)
    scores: dict[str, deque] = field(default_factory=dict)
    tokens: deque = field(default_factory=deque)
    served: deque = field(default_factory=deque)  # 1 where the served bucket was right


class OnlineLearner:
    def __init__(self, buckets: BucketSpec, prior_shares: np.ndarray | None = None,
                 config: OnlineConfig = OnlineConfig()) -> None:
        self.spec = buckets
        self.config = config
        k = buckets.num_buckets
        shares = np.full(k, 1.0 / k) if prior_shares is None else np.asarray(prior_shares, float)
        self.prior_shares = np.clip(shares / shares.sum(), 1e-3, None)
        self.head: Head | None = None
        self.num_labels = 0
        self._since_fit = 0
        self._features: deque = deque(maxlen=config.buffer_size)
        self._tokens: deque = deque(maxlen=config.buffer_size)
        self._prior_scores: deque = deque(maxlen=config.buffer_size)
        w = config.window
        self._recent = _Recent({c: deque(maxlen=w) for c in BUCKET_CANDIDATES},
                               {c: deque(maxlen=w) for c in SCORE_CANDIDATES}, deque(maxlen=w), deque(maxlen=w))
        self.bucket_source, self.score_source = "prior", "prior"

    # ---- predicting --------------------------------------------------------------------------
    def label_shares(self) -> np.ndarray:
        """Running label shares, smoothed toward the prior's training shares."""
        pseudo = self.config.prior_pseudo_labels * self.prior_shares
        counts = np.bincount([self.spec.bucket_of(t) for t in self._recent.tokens], minlength=len(pseudo))
        return (counts + pseudo) / (counts.sum() + pseudo.sum())

    def candidates(self, rows: Featured) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        n = len(rows.score)
        shifted = rows.probs * (self.label_shares() / self.prior_shares)
        buckets = {
            "majority": np.full(n, int(self.label_shares().argmax())),
            "prior": rows.probs.argmax(1),
            "shifted": shifted.argmax(1),
        }
        scores = {"prior": np.asarray(rows.score, float)}
        if self.head is not None:
            scores["prior"] = self.head.prior_score(rows.score)
            buckets["head"] = self.head.probs(rows.features).argmax(1)
            buckets["regress"] = self.head.regress_probs(rows.features).argmax(1)
            buckets["recent"] = self.head.regress_probs(rows.features, recent=True).argmax(1)
            scores["head"] = self.head.score(rows.features)
            scores["recent"] = self.head.recent_score(rows.features)
        return buckets, scores

    def predict(self, rows: Featured) -> tuple[np.ndarray, np.ndarray]:
        """Bucket ids and ranking scores from the candidates that did best on the recent labels."""
        buckets, scores = self.candidates(rows)
        return buckets[self.bucket_source], scores.get(self.score_source, scores["prior"])

    # ---- learning ----------------------------------------------------------------------------
    def observe(self, rows: Featured, tokens: np.ndarray) -> None:
        """Labels for `rows`: first scored against every candidate (prequential), then learned."""
        tokens = np.asarray(tokens, int)
        true = np.array([self.spec.bucket_of(int(t)) for t in tokens])
        buckets, scores = self.candidates(rows)
        served = buckets[self.bucket_source]
        recent = self._recent
        for i in range(len(tokens)):
            for name, queue in recent.buckets.items():
                queue.append(buckets[name][i] if name in buckets else -1)
            for name, queue in recent.scores.items():
                queue.append(scores[name][i] if name in scores else np.nan)
            recent.tokens.append(int(tokens[i]))
            recent.served.append(int(served[i] == true[i]))
            self._features.append(rows.features[i])
            self._tokens.append(int(tokens[i]))
            self._prior_scores.append(float(rows.score[i]))
        self.num_labels += len(tokens)
        self._since_fit += len(tokens)
        self._choose()

    def online_accuracy(self) -> float | None:
        """Accuracy of the served buckets over the recent labels (None before any)."""
        served = self._recent.served
        return float(np.mean(served)) if served else None

    def due(self) -> bool:
        return self._since_fit >= self.config.refit_every and self.num_labels >= self.config.min_fit_examples

    def training_set(self) -> TrainingSet:
        """A copy of the buffer, to fit on outside the caller's lock."""
        self._since_fit = 0
        tokens = np.array(self._tokens, dtype=np.int64)
        return TrainingSet(np.array(self._features, dtype=np.float64), tokens,
                           np.array([self.spec.bucket_of(int(t)) for t in tokens]),
                           np.array(self._prior_scores, dtype=np.float64))

    def fit(self) -> None:
        self.head = fit_head(self.training_set(), self.spec, self.config, self.head)

    def _choose(self) -> None:
        """Serve the candidates with the best accuracy / tau over the recent labels."""
        recent = self._recent
        true = np.array([self.spec.bucket_of(t) for t in recent.tokens])
        best, best_acc = self.bucket_source, -1.0
        for name in BUCKET_CANDIDATES:  # later names win ties: the more adapted candidate
            guess = np.array(recent.buckets[name])
            known = guess >= 0
            if name in FITTED and known.sum() < min(len(guess), self.config.min_fit_examples):
                continue
            acc = float(np.mean(guess[known] == true[known])) if known.any() else -1.0
            if acc >= best_acc:
                best, best_acc = name, acc
        self.bucket_source = best
        tokens = np.array(recent.tokens, float)
        fitted = np.array(recent.scores["head"], float)
        known = ~np.isnan(fitted)
        if known.sum() >= self.config.min_fit_examples and len(tokens) >= 8:
            taus = {name: np.nan_to_num(kendall_tau_b(np.array(recent.scores[name], float)[known], tokens[known]),
                                        nan=-1.0) for name in SCORE_CANDIDATES}
            best = max(taus, key=taus.get)
            # a margin: switching sources mid-stream costs ranking consistency of its own
            if taus[best] > taus.get(self.score_source, -1.0) + SCORE_SWITCH_MARGIN:
                self.score_source = best


def _ridge_loo(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Ridge regression of y on x (both centred: the intercept is unpenalised), its strength the one
    of RIDGE_STRENGTHS with the least exact leave-one-out error; weights [d + 1], LOO RMS error."""
    n = len(y)
    x_mean, y_mean = x.mean(0), y.mean()
    xc, yc = x - x_mean, y - y_mean
    s, v = np.linalg.eigh(xc.T @ xc)
    xv = xc @ v
    proj = v.T @ (xc.T @ yc)
    best = (np.inf, np.zeros(x.shape[1]))
    for lam in RIDGE_STRENGTHS:
        shrink = 1.0 / (np.clip(s, 0, None) + lam * n)
        w = v @ (proj * shrink)
        leverage = (xv**2 * shrink).sum(1) + 1.0 / n  # + the intercept's
        loo = float(np.mean(((yc - xc @ w) / np.clip(1 - leverage, 1e-6, None)) ** 2))
        if loo < best[0]:
            best = (loo, w)
    return np.append(best[1], y_mean - x_mean @ best[1]), math.sqrt(best[0])


def fit_head(data: TrainingSet, spec: BucketSpec, config: OnlineConfig, warm: Head | None = None) -> Head:
    """Softmax regression on the buckets (L-BFGS, warm-started) and ridge regression on log length."""
    import torch

    num_buckets = spec.num_buckets

    mean = data.features.mean(0)
    std = data.features.std(0) + 1e-6
    head = Head(mean, std, np.zeros((data.features.shape[1] + 1, num_buckets)), np.zeros(data.features.shape[1] + 1))
    x = head.design(data.features)
    target = np.log1p(data.tokens.astype(float))
    head.score_w, head.sigma = _ridge_loo(x[:, :-1], target)
    if len(target) > config.recent_labels:
        head.recent_w, head.recent_sigma = _ridge_loo(x[-config.recent_labels :, :-1], target[-config.recent_labels :])
    head.edges = np.log1p([spec.lower(b) - 0.5 for b in range(1, num_buckets)])
    prior = data.prior_score
    if prior.std() > 0:  # the prior's score as log length: least squares, a monotone map
        slope = float(np.cov(prior, target)[0, 1] / prior.var(ddof=1))
        head.prior_w = (slope, float(target.mean() - slope * prior.mean()))

    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(data.buckets, dtype=torch.long)
    start = warm.bucket_w if warm is not None and warm.bucket_w.shape == head.bucket_w.shape else head.bucket_w
    w = torch.tensor(start, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=config.fit_steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w, yt) + config.l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head.bucket_w = w.detach().double().numpy()
    return head
