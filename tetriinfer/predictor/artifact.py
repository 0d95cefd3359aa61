"""A trained predictor on disk: `predictor.json` (what it is) beside the model's own files.

predictor.json: kind (`builtin` | `hf`), buckets, where the ranking score comes from
(`score_source`: `head`, the score output trained with the ranking loss; `expected`, the expected
length under the bucket distribution; `expected_log_length`, the expected log length under it; see
`objectives.bucket_probs_and_scores`), the training labels' majority bucket (the fallback), the
label tokenizer file, the model's config and a training summary. Reading it needs no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tetriinfer.sched.lengths import BucketSpec

META_FILE = "predictor.json"
DEFAULT_DIR = Path(__file__).parent / "default"
KINDS = ("builtin", "hf")
SCORE_SOURCES = ("head", "expected", "expected_log_length")
BUCKET_SCORE_SOURCES = ("expected", "expected_log_length")  # need trained bucket logits


def check_score_source(score: str, losses: list[str | None]) -> None:
    """Refuse a ranking score that models trained with `losses` did not learn to give."""
    if score not in SCORE_SOURCES:
        raise ValueError(f"score must be one of {SCORE_SOURCES}, got {score!r}")
    if score in BUCKET_SCORE_SOURCES and "rank" in losses:
        raise ValueError(f"score {score!r} needs trained bucket logits, which loss 'rank' does not train")
    if score == "head" and "ce" in losses:
        raise ValueError("score 'head' needs the ranking loss's score output, which loss 'ce' does not train")


@dataclass
class PredictorMeta:
    kind: str
    buckets: BucketSpec
    score_source: str
    majority_bucket: int
    label_tokenizer: str
    model: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.score_source not in SCORE_SOURCES:
            raise ValueError(f"score_source must be one of {SCORE_SOURCES}, got {self.score_source!r}")


def write_meta(model_dir: Path, meta: PredictorMeta) -> None:
    (model_dir / META_FILE).write_text(json.dumps(asdict(meta), indent=1) + "\n")


def read_meta(model_dir: str | Path) -> PredictorMeta:
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a predictor directory (no {META_FILE})")
    raw = json.loads(path.read_text())
    return PredictorMeta(**{**raw, "buckets": BucketSpec(**raw["buckets"])})


def load_model(model_dir: Path, meta: PredictorMeta):
    """The torch model of a predictor directory, in eval mode."""
    if meta.kind == "builtin":
        from tetriinfer.predictor.model_builtin import BuiltinLengthModel

        return BuiltinLengthModel.load(model_dir, meta.model)
    from tetriinfer.predictor.model_hf import HFLengthModel

    return HFLengthModel.load(model_dir, meta.model)
