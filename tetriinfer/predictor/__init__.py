"""Decode-length predictor: train / evaluate / serve (see docs/predictor.md).

The prefill side calls `load_predictor(dir_or_None_or_"none").predict(prompts)` or `.submit(prompts)`.
This package root imports no torch; the model loads on first `load_predictor`.
"""

from tetriinfer.sched.lengths import BucketSpec
from tetriinfer.predictor.serving import (
    ConstantPredictor,
    LengthPrediction,
    LengthPredictor,
    ModelLengthPredictor,
    load_predictor,
)

__all__ = [
    "BucketSpec",
    "ConstantPredictor",
    "LengthPrediction",
    "LengthPredictor",
    "ModelLengthPredictor",
    "load_predictor",
]
