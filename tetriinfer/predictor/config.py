"""Typed configuration for training a length predictor (the CLI builds this; one source of defaults)."""

from __future__ import annotations

from dataclasses import dataclass

FORMS = ("bag", "transformer")  # the built-in model's forms (model_builtin.py)
LOSSES = ("ce", "rank", "ce+rank")
SELECTIONS = ("auto", "accuracy", "tau")


@dataclass
class TrainConfig:
    """`model` is a built-in form (`bag`, `transformer`) or a local Hugging Face model directory.

    `loss`: `ce` trains the bucket logits only (the paper), `rank` the score output only with a
    pairwise (RankNet) loss over all pairs in a batch, `ce+rank` both, summed.
    """

    data: str
    out: str
    model: str = "bag"
    granularity: int = 200
    open_from: int = 1000
    loss: str = "ce+rank"
    rank_weight: float = 1.0
    epochs: int = 4
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    vocab_size: int = 8192
    dim: int = 48
    max_prompt_tokens: int = 512
    label_tokenizer: str | None = None
    max_train_examples: int | None = None
    eval_every: int = 200
    seed: int = 0
    threads: int = 1
    features: str = "shape"  # built-in models: features.FEATURE_SETS
    hidden: int = 128  # built-in models: the MLP head's width
    select: str = "auto"  # checkpoint kept by val `accuracy`, `tau`, or `auto` (tau for `rank`, else accuracy)
    score: str | None = None  # ranking score (artifact.SCORE_SOURCES); None: `expected` for `ce`, else `head`

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.granularity < 1 or self.epochs < 1 or self.batch_size < 2:
            raise ValueError("granularity and epochs must be >= 1, batch_size >= 2")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if self.score is not None:
            from tetriinfer.predictor.artifact import check_score_source

            check_score_source(self.score, [self.loss])

    @property
    def is_builtin(self) -> bool:
        return self.model in FORMS
