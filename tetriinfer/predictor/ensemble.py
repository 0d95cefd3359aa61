"""`tetriinfer predictor ensemble`: several trained built-in predictors as one.

The members must share shape, buckets and tokenizer (runs of `predictor train` that differ in
`--seed`, or in the loss, have the same tokenizer: it is learned from a fixed sample). The
ensemble averages the members' bucket probabilities and their ranking scores, each score first
standardised by its mean and spread over the validation prompts (`DATA/val.jsonl`), so no member
weighs more for its scale. One tokenizer pass serves all members. `score` picks what the ensemble
ranks by (`predictor.json`'s `score_source`): by default the averaged score (`head`; `expected` if
any member was trained without the ranking loss), or `expected` / `expected_log_length` from the
averaged bucket probabilities.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tetriinfer.predictor.artifact import check_score_source, load_model, read_meta, write_meta
from tetriinfer.predictor.examples import read_examples
from tetriinfer.predictor.metrics import accuracy, kendall_tau_b
from tetriinfer.predictor.model_builtin import BuiltinLengthModel, BuiltinModelConfig, TOKENIZER_FILE
from tetriinfer.predictor.train import encode_prompts, label_tokens, predict_encoded


def _shape(model: dict) -> dict:
    """A member's model shape; runs written before `members` was recorded count as one member."""
    return {"members": 1, **model}


def combine(run_dirs: list[str | Path], out: str | Path, data: str | Path, score: str | None = None) -> dict:
    """Write the ensemble of `run_dirs` to `out`, ranking by `score` (a `SCORE_SOURCES` name; None:
    the members' own); returns its validation accuracy and tau."""
    run_dirs, out = [Path(d) for d in run_dirs], Path(out)
    if len(run_dirs) < 2:
        raise ValueError("an ensemble needs at least two predictor directories")
    metas = [read_meta(d) for d in run_dirs]
    first = metas[0]
    tokenizer_text = (run_dirs[0] / TOKENIZER_FILE).read_text()
    for d, meta in zip(run_dirs, metas):
        if meta.kind != "builtin" or meta.model.get("members", 1) != 1:
            raise ValueError(f"{d}: members must be single built-in models")
        if _shape(meta.model) != _shape(first.model) or meta.buckets != first.buckets:
            raise ValueError(f"{d}: model shape or buckets differ from {run_dirs[0]}")
        if (d / TOKENIZER_FILE).read_text() != tokenizer_text:
            raise ValueError(f"{d}: tokenizer differs from {run_dirs[0]}'s")
    losses = [m.training.get("config", {}).get("loss") for m in metas]
    if "rank" in losses and len(set(losses)) > 1:
        raise ValueError("a `rank` member's buckets are untrained: ensemble rank members only with each other")
    if score is not None:
        check_score_source(score, losses)
    members = [load_model(d, m) for d, m in zip(run_dirs, metas)]
    cfg = replace(BuiltinModelConfig(**first.model), members=len(members))
    ensemble = BuiltinLengthModel(cfg, members[0].tokenizer)
    for i, member in enumerate(members):
        ensemble.encoder.members[i].load_state_dict(member.encoder.state_dict())
        ensemble.head.heads[i].load_state_dict(member.head.state_dict())

    val = read_examples(Path(data) / "val.jsonl")
    encoded = encode_prompts(ensemble, [ex.prompt for ex in val], "val")
    tokens = label_tokens(val, members[0].tokenizer)
    with torch.inference_mode():
        raw = torch.cat([
            torch.stack([o[:, -1] for o in ensemble.head.member_outputs(
                ensemble.encoder(**ensemble.collate(encoded[s : s + 256])))], 1)
            for s in range(0, len(encoded), 256)
        ])
    ensemble.head.score_shift.copy_(raw.mean(0))
    ensemble.head.score_scale.copy_(raw.std(0).clamp_min(1e-6))
    score_source = score or ("head" if all(m.score_source == "head" for m in metas) else "expected")
    predicted, scores = predict_encoded(ensemble.eval(), encoded, first.buckets, score_source)
    true_buckets = np.array([first.buckets.bucket_of(int(t)) for t in tokens])
    summary = {"val_accuracy": accuracy(predicted, true_buckets), "val_tau": kendall_tau_b(scores, tokens)}

    out.mkdir(parents=True, exist_ok=True)
    ensemble.save(out)
    if first.label_tokenizer != TOKENIZER_FILE:
        shutil.copy(run_dirs[0] / first.label_tokenizer, out / first.label_tokenizer)
    training = {
        "members": [{"dir": str(d), "config": m.training.get("config"), "best": m.training.get("best"),
                     "train_seconds": m.training.get("train_seconds")} for d, m in zip(run_dirs, metas)],
        "train_examples": first.training.get("train_examples"),
        "val_examples": len(val),
        "parameters": ensemble.num_parameters(),
        "train_seconds": round(sum(m.training.get("train_seconds", 0.0) for m in metas), 1),
        "ensemble_val": {k: round(v, 4) for k, v in summary.items()},
        "label_shares": first.training.get("label_shares"),
        # evaluate reads the loss to know whether buckets were trained; report shows model and loss
        "config": {"model": f"{cfg.form}x{len(members)}", "loss": "/".join(sorted(set(map(str, losses))))},
    }
    write_meta(out, replace(first, score_source=score_source, model=ensemble.config_dict(), training=training))
    curves = [json.loads((d / "curves.json").read_text()) for d in run_dirs if (d / "curves.json").is_file()]
    (out / "curves.json").write_text(json.dumps({"members": curves}, indent=1) + "\n")
    return summary
