"""Training a length model on (prompt, reply length) examples, with validation curves.

`data` is a directory with `train.jsonl` and `val.jsonl` (written by `tetriinfer predictor
prepare`). Batches group prompts of similar length (less padding); the checkpoint kept is the
one with the best validation selection metric (accuracy, or Kendall's tau for `rank`).
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tetriinfer.predictor.artifact import PredictorMeta, write_meta
from tetriinfer.sched.lengths import BucketSpec
from tetriinfer.predictor.config import TrainConfig
from tetriinfer.predictor.examples import LengthExample, read_examples
from tetriinfer.predictor.metrics import accuracy, kendall_tau_b, majority_bucket
from tetriinfer.predictor.model_builtin import Encoded
from tetriinfer.predictor.objectives import bucket_probs_and_scores, length_loss
from tetriinfer.predictor.tokenizer import count_tokens, load_tokenizer, train_bpe

LABEL_TOKENIZER_FILE = "label_tokenizer.json"
TOKENIZER_SAMPLE = 10_000  # training examples the built-in BPE tokenizer learns from


def length_grouped_batches(encoded: list[Encoded], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches by prompt length, then shuffle the batches."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    window = 50 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(encoded[i].ids))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [b for b in batches if len(b) > 1]


@dataclass
class LabelledSet:
    encoded: list[Encoded]
    tokens: np.ndarray
    buckets: np.ndarray


def label_tokens(examples: list[LengthExample], label_tokenizer) -> np.ndarray:
    """Reply lengths in tokens: `output_tokens` where given, else the reply counted by the tokenizer."""
    texts = [ex.response or "" for ex in examples]
    counted = count_tokens(label_tokenizer, texts)
    return np.array(
        [ex.output_tokens if ex.output_tokens is not None else n for ex, n in zip(examples, counted)], dtype=np.int64
    )


def encode_prompts(model, prompts: list[str], desc: str, chunk: int = 2048) -> list[Encoded]:
    out: list[Encoded] = []
    for start in tqdm(range(0, len(prompts), chunk), desc=f"tokenize {desc}", unit="chunk", leave=False):
        out += model.tokenize(prompts[start : start + chunk])
    return out


@torch.inference_mode()
def predict_encoded(model, encoded: list[Encoded], buckets: BucketSpec, score_source: str, batch_size: int = 128):
    """Bucket predictions and scores for pre-tokenized prompts."""
    model.eval()
    bucket_out, score_out = [], []
    for start in range(0, len(encoded), batch_size):
        logits = model(**model.collate(encoded[start : start + batch_size]))
        probs, scores = bucket_probs_and_scores(logits, buckets, score_source)
        bucket_out.append(probs.argmax(1).numpy())
        score_out.append(scores.numpy())
    return np.concatenate(bucket_out), np.concatenate(score_out)


def _build_model(cfg: TrainConfig, train_examples: list[LengthExample], num_outputs: int):
    if cfg.is_builtin:
        from tetriinfer.predictor.model_builtin import BuiltinLengthModel, BuiltinModelConfig

        # a fixed sample keeps BPE training short and gives every run the same tokenizer (same labels)
        sample = random.Random(0).sample(train_examples, min(TOKENIZER_SAMPLE, len(train_examples)))
        tokenizer = train_bpe([t[-2000:] for ex in sample for t in (ex.prompt, ex.response or "")], cfg.vocab_size)
        model_cfg = BuiltinModelConfig(
            form=cfg.model, vocab_size=tokenizer.get_vocab_size(), num_outputs=num_outputs,
            dim=cfg.dim, hidden=cfg.hidden, max_prompt_tokens=cfg.max_prompt_tokens, features=cfg.features,
        )
        return BuiltinLengthModel(model_cfg, tokenizer), tokenizer
    from tetriinfer.predictor.model_hf import HFLengthModel

    model = HFLengthModel.from_pretrained(cfg.model, num_outputs, cfg.max_prompt_tokens)
    return model, model.tokenizer.backend_tokenizer


def have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot_curves(curves: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c["step"] for c in curves]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(steps, [c["train_loss"] for c in curves], label="train")
    ax_loss.plot(steps, [c["val_loss"] for c in curves], label="validation")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_metric.plot(steps, [c["val_accuracy"] for c in curves], label="val bucket accuracy")
    ax_metric.plot(steps, [c["val_tau"] for c in curves], label="val Kendall tau")
    ax_metric.axhline(curves[0]["majority_accuracy"], color="gray", ls="--", label="majority baseline")
    ax_metric.set_xlabel("step")
    ax_metric.set_ylim(0, 1)
    ax_metric.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _selection_metric(cfg: TrainConfig) -> str:
    """The validation metric that picks the checkpoint: `--select`, or by default tau when buckets
    are not trained and accuracy when they are."""
    if cfg.select != "auto":
        return f"val_{cfg.select}"
    return "val_tau" if cfg.loss == "rank" else "val_accuracy"


def _validate(model, val: LabelledSet, buckets: BucketSpec, score_source: str, cfg: TrainConfig) -> dict:
    """Validation loss, bucket accuracy and Kendall's tau; leaves the model in train mode."""
    predicted, scores = predict_encoded(model, val.encoded, buckets, score_source)
    with torch.inference_mode():
        losses = [
            length_loss(
                model(**model.collate([val.encoded[i] for i in idx])),
                torch.tensor(val.buckets[idx]), torch.tensor(val.tokens[idx]), buckets.num_buckets, cfg,
            ).item()
            for idx in np.array_split(np.arange(len(val.encoded)), max(1, len(val.encoded) // 256))
        ]
    model.train()
    return {
        "val_loss": float(np.mean(losses)),
        "val_accuracy": accuracy(predicted, val.buckets),
        "val_tau": kendall_tau_b(scores, val.tokens),
    }


def _fit(model, sets: dict[str, LabelledSet], buckets: BucketSpec, score_source: str, cfg: TrainConfig,
         rng: random.Random) -> tuple[list[dict], float]:
    """AdamW with warmup and linear decay; keeps the best validation checkpoint. Returns curves, best."""
    train_set, val_set = sets["train"], sets["val"]
    majority = majority_bucket(train_set.buckets, buckets.num_buckets)
    majority_acc = accuracy(np.full(len(val_set.buckets), majority), val_set.buckets)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    epoch_batches = [length_grouped_batches(train_set.encoded, cfg.batch_size, rng) for _ in range(cfg.epochs)]
    total_steps = sum(len(b) for b in epoch_batches)
    warmup = max(1, min(100, total_steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then linear decay to zero
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, 1 - step / total_steps)
    )
    selection = _selection_metric(cfg)
    curves: list[dict] = []
    best, best_state = -float("inf"), None
    step, running = 0, []
    model.train()
    with tqdm(total=total_steps, desc=f"train {cfg.model} {cfg.loss} g={cfg.granularity}", unit="step") as bar:
        for batches in epoch_batches:
            for idx in batches:
                logits = model(**model.collate([train_set.encoded[i] for i in idx]))
                loss = length_loss(
                    logits, torch.tensor(train_set.buckets[idx]), torch.tensor(train_set.tokens[idx]),
                    buckets.num_buckets, cfg,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                step += 1
                running.append(loss.item())
                bar.update()
                if step % cfg.eval_every == 0 or step == total_steps:
                    point = {"step": step, "train_loss": float(np.mean(running)), "majority_accuracy": majority_acc,
                             **_validate(model, val_set, buckets, score_source, cfg)}
                    running = []
                    curves.append(point)
                    bar.set_postfix(acc=f"{point['val_accuracy']:.3f}", tau=f"{point['val_tau']:.3f}")
                    if point[selection] > best:
                        best, best_state = point[selection], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return curves, best


def train(cfg: TrainConfig) -> PredictorMeta:
    """Train per `cfg`, write the predictor directory `cfg.out`, return its metadata."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    train_examples = read_examples(Path(cfg.data) / "train.jsonl")
    val_examples = read_examples(Path(cfg.data) / "val.jsonl")
    if cfg.max_train_examples is not None:
        train_examples = rng.sample(train_examples, min(cfg.max_train_examples, len(train_examples)))

    buckets = BucketSpec.covering(cfg.granularity, cfg.open_from)
    model, own_tokenizer = _build_model(cfg, train_examples, buckets.num_buckets + 1)
    label_tok = load_tokenizer(cfg.label_tokenizer) if cfg.label_tokenizer else own_tokenizer
    sets = {}
    for name, examples in (("train", train_examples), ("val", val_examples)):
        tokens = label_tokens(examples, label_tok)
        sets[name] = LabelledSet(
            encode_prompts(model, [ex.prompt for ex in examples], name),
            tokens,
            np.array([buckets.bucket_of(int(t)) for t in tokens]),
        )
    score_source = cfg.score or ("expected" if cfg.loss == "ce" else "head")
    curves, best = _fit(model, sets, buckets, score_source, cfg, rng)
    train_seconds = time.perf_counter() - started

    model.save(out)
    if cfg.label_tokenizer:
        label_file = LABEL_TOKENIZER_FILE
        label_tok.save(str(out / label_file))
    else:  # labels counted in the model's own tokens: point at the tokenizer file it saved
        label_file = "tokenizer.json" if cfg.is_builtin else "hf/tokenizer.json"
    meta = PredictorMeta(
        kind="builtin" if cfg.is_builtin else "hf",
        buckets=buckets,
        score_source=score_source,
        majority_bucket=majority_bucket(sets["train"].buckets, buckets.num_buckets),
        label_tokenizer=label_file,
        model=model.config_dict(),
        training={
            "config": asdict(cfg),
            "train_examples": len(train_examples),
            "val_examples": len(val_examples),
            "parameters": model.num_parameters(),
            "train_seconds": round(train_seconds, 1),
            "best": {_selection_metric(cfg): best},
            # the online learner's label-shift correction divides by these (learner.OnlineLearner)
            "label_shares": (np.bincount(sets["train"].buckets, minlength=buckets.num_buckets)
                             / len(sets["train"].buckets)).round(4).tolist(),
        },
    )
    write_meta(out, meta)
    (out / "curves.json").write_text(json.dumps(curves, indent=1) + "\n")
    if have_matplotlib():
        plot_curves(curves, out / "curves.png", f"{cfg.model} · {cfg.loss} · {cfg.granularity}-token buckets")
    else:
        print(f"{out / 'curves.png'} not drawn: no matplotlib (pip install 'tetriinfer[plot]'); curves.json has the data")
    return meta
