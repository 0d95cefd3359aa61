"""`LengthPredictor`: what the prefill side calls to predict decode lengths.

`predict` takes a batch of prompts (text, or token ids with a `decode` function) and returns one
`LengthPrediction` each. It is thread-safe (one lock around the model), and `submit` runs it on
the predictor's own worker thread and returns a future, so the prefill loop never waits on it.
torch releases the GIL inside its kernels, so the prefill's Python keeps running meanwhile.
The probe (`predictor.probe`) also takes each prompt's hidden state from the served model
(`hidden=`); a predictor that reads none refuses it.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tetriinfer.predictor.artifact import DEFAULT_DIR, load_model, read_meta
from tetriinfer.sched.lengths import BucketSpec

Prompts = Sequence[str] | Sequence[Sequence[int]]
DISABLED = "none"
STATIC = "static"  # "static" / "static:DIR": the model as trained, no online adaptation
PROBE = "probe"  # "probe" / "probe:DIR": online, its head on the served model's hidden state


@dataclass(frozen=True)
class LengthPrediction:
    """Predicted decode length: a bucket [lower, upper) in tokens and a ranking score.

    Resource estimates use `lower` (the paper's choice); `score` orders requests (higher = longer).
    """

    bucket: int
    lower: int
    upper: int
    score: float


class LengthPredictor(ABC):
    """Predicts decode lengths for batches of prompts; `buckets` says what the bucket ids mean."""

    def __init__(self, buckets: BucketSpec) -> None:
        self.buckets = buckets
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    @abstractmethod
    def predict(self, prompts: Prompts) -> list[LengthPrediction]: ...

    def submit(self, prompts: Prompts, hidden: Sequence | None = None) -> Future:
        """Predict on the predictor's worker thread; the future resolves to list[LengthPrediction].
        `hidden`: the prompts' hidden states, for a predictor whose `predict` reads them (the probe)."""
        args = (list(prompts),) if hidden is None else (list(prompts), list(hidden))
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="length-predictor")
            return self._executor.submit(self.predict, *args)

    def observe(self, prompt, output_len: int, hidden=None) -> None:
        """A finished request's prompt, true output length and (the probe's) hidden state; a static
        predictor learns nothing."""

    def close(self) -> None:
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _prediction(self, bucket: int, score: float) -> LengthPrediction:
        return LengthPrediction(bucket, self.buckets.lower(bucket), self.buckets.upper(bucket), score)


class ConstantPredictor(LengthPredictor):
    """The fallback when prediction is disabled: always the training labels' majority bucket.

    Every score is 0.0, so length-aware policies see ties and keep arrival order.
    """

    def __init__(self, buckets: BucketSpec, bucket: int) -> None:
        if not 0 <= bucket < buckets.num_buckets:
            raise ValueError(f"bucket {bucket} outside 0..{buckets.num_buckets - 1}")
        super().__init__(buckets)
        self.bucket = bucket

    def predict(self, prompts: Prompts) -> list[LengthPrediction]:
        return [self._prediction(self.bucket, 0.0) for _ in prompts]


class ModelLengthPredictor(LengthPredictor):
    """A trained model (built-in or Hugging Face) behind the `LengthPredictor` interface."""

    def __init__(
        self,
        model,
        buckets: BucketSpec,
        score_source: str,
        decode: Callable[[list[int]], str] | None = None,
        max_batch_size: int = 64,
        device: str = "cpu",
    ) -> None:
        super().__init__(buckets)
        self.model = model.eval().to(device)
        self.device = device
        self.score_source = score_source
        self.decode = decode
        self.max_batch_size = max_batch_size
        self._lock = threading.Lock()

    def _texts(self, prompts: Prompts) -> list[str]:
        texts = []
        for p in prompts:
            if isinstance(p, str):
                texts.append(p)
            elif self.decode is None:
                raise TypeError("token-id prompts need load_predictor(..., decode=served_tokenizer.decode)")
            else:
                texts.append(self.decode(list(p)))
        return texts

    def predict(self, prompts: Prompts) -> list[LengthPrediction]:
        import torch

        from tetriinfer.predictor.objectives import bucket_probs_and_scores

        texts = self._texts(prompts)
        out: list[LengthPrediction] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self.max_batch_size):
                encoded = self.model.tokenize(texts[start : start + self.max_batch_size])
                batch = {k: v.to(self.device) for k, v in self.model.collate(encoded).items()}
                logits = self.model(**batch).cpu()
                probs, scores = bucket_probs_and_scores(logits, self.buckets, self.score_source)
                for bucket, score in zip(probs.argmax(1).tolist(), scores.tolist()):
                    out.append(self._prediction(bucket, score))
        return out


def load_predictor(
    path: str | Path | None = None,
    decode: Callable[[list[int]], str] | None = None,
    device: str = "cpu",
    online: bool = False,
) -> LengthPredictor:
    """The predictor in `path` (default: the shipped model); `"none"` gives the constant fallback.

    `decode` turns the served model's token ids back into text, for callers that pass ids.
    `device`: where the model runs; the built-in model is meant for the CPU, beside the GPU prefill.
    `online`: wrap it in `online.OnlineLengthPredictor`, which learns from `observe(prompt, length)`;
    a path `"static"` or `"static:DIR"` turns that off (what `serve --predictor static` asks for),
    `"probe"` or `"probe:DIR"` makes it the probe, whose head reads the served model's hidden state
    (`hidden=` with every prompt and label: `serve --predictor probe`).
    """
    spec = str(path) if path is not None else ""
    probe = reads_prompt_hidden(spec)
    if spec == STATIC or spec.startswith(STATIC + ":"):
        online, path = False, spec[len(STATIC) + 1 :] or None
    elif probe:
        online, path = True, spec[len(PROBE) + 1 :] or None
    if path is not None and str(path) == DISABLED:
        meta = read_meta(DEFAULT_DIR)
        return ConstantPredictor(meta.buckets, meta.majority_bucket)
    model_dir = Path(path) if path is not None else DEFAULT_DIR
    meta = read_meta(model_dir)
    prior = ModelLengthPredictor(load_model(model_dir, meta), meta.buckets, meta.score_source, decode, device=device)
    if not online:
        return prior
    from tetriinfer.predictor.online import online_predictor

    return online_predictor(prior, meta.training.get("label_shares"), hidden_features=probe)


def reads_prompt_hidden(spec: str | None) -> bool:
    """Whether the predictor `spec` (a `load_predictor` path) learns on the served model's hidden
    state: its engine must keep it (`EngineConfig.capture_prompt_hidden`)."""
    return spec is not None and (spec == PROBE or spec.startswith(PROBE + ":"))
