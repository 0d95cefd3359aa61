"""Regenerates the online-adaptation tables of docs/predictor.md (raw numbers: online_eval.json).

    python docs/predictor/online_eval.py --data-root ../shared/data --out docs/predictor/online_eval.json

Streams (each predicted prequentially: a block of `--every` examples is predicted, then its labels
are revealed; labels are counted in the shipped predictor's tokenizer):
- sharegpt: the ShareGPT test split in file order (a conversation's turns together), the prior's own
  distribution;
- alpaca:MODEL: AlpacaEval's 805 instructions answered by one model (16 models), shuffled (seed 0);
- gsm8k: the GSM8K test questions with their worked answers, shuffled;
- mt-bench: the 30 questions with GPT-4 reference answers, both turns (60 examples);
- switch:A>B>...: streams concatenated; each segment scored on its own, against a running majority
  that restarts at the switch (what a learner that knew of the switch could do without features).
Modes: `prior` (the shipped model alone), `online` (OnlineLearner on the prior's features), `probe`
(OnlineLearner on the last-prompt-token hidden state of a tiny random Llama built with transformers).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tetriinfer.predictor.artifact import DEFAULT_DIR, read_meta  # noqa: E402
from tetriinfer.predictor.examples import LengthExample, read_examples  # noqa: E402
from tetriinfer.predictor.learner import Featured, OnlineConfig  # noqa: E402
from tetriinfer.predictor.online import PriorFeaturizer  # noqa: E402
from tetriinfer.predictor.prequential import StreamPredictions, featurize_all, run_stream, score_stream  # noqa: E402
from tetriinfer.predictor.serving import load_predictor  # noqa: E402
from tetriinfer.predictor.sources import format_turn, gsm8k_examples, sharegpt_examples, split_examples  # noqa: E402
from tetriinfer.predictor.tokenizer import load_tokenizer  # noqa: E402
from tetriinfer.predictor.train import label_tokens  # noqa: E402


def alpaca_by_model(root: Path) -> dict[str, list[LengthExample]]:
    with open(root / "alpaca-eval" / "prompts.jsonl", encoding="utf-8") as f:
        prompts = {row["idx"]: row["instruction"] for row in map(json.loads, f)}
    out: dict[str, list[LengthExample]] = {}
    with gzip.open(root / "alpaca-eval" / "outputs_selected_models.jsonl.gz", "rt", encoding="utf-8") as f:
        for row in map(json.loads, f):
            out.setdefault(row["generator"], []).append(
                LengthExample(format_turn("human", prompts[row["idx"]]), response=row["output"]))
    return out


def mt_bench(root: Path) -> list[LengthExample]:
    with open(root / "mt-bench" / "question.jsonl", encoding="utf-8") as f:
        questions = {q["question_id"]: q["turns"] for q in map(json.loads, f)}
    out = []
    with open(root / "mt-bench" / "reference_answer_gpt-4.jsonl", encoding="utf-8") as f:
        for ref in map(json.loads, f):
            turns, answers = questions[ref["question_id"]], ref["choices"][0]["turns"]
            context = ""
            for turn, answer in zip(turns, answers):
                out.append(LengthExample(context + format_turn("human", turn), response=answer))
                context += format_turn("human", turn) + format_turn("gpt", answer)
    return out


def shuffled(examples: list, seed: int = 0) -> list:
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    return examples


class TinyProbe:
    """Hidden states of a tiny random Llama over the predictor's own BPE ids (cached per prompt)."""

    def __init__(self, prior_featurize, vocab_size: int) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        from tetriinfer.predictor.probe import HiddenStateProbe

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        tokenizer = load_tokenizer(DEFAULT_DIR / "tokenizer.json")
        self.probe = HiddenStateProbe(LlamaForCausalLM(config), lambda t: tokenizer.encode(t).ids, prior_featurize)
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, prompts) -> Featured:
        prior = self.probe.prior_featurize(prompts)
        for p in prompts:
            if p not in self.cache:
                self.cache[p] = self.probe.hidden(self.probe.encode(p))
        return Featured(np.stack([self.cache[p] for p in prompts]), prior.probs, prior.score)


def segment_report(pred: StreamPredictions, tokens: np.ndarray, bounds: list[tuple[str, int, int]], spec,
                   every: int) -> list[dict]:
    out = []
    for name, start, stop in bounds:
        part = StreamPredictions(pred.buckets[start:stop], pred.scores[start:stop], np.zeros(stop - start, int),
                                 pred.bucket_source, pred.score_source)
        counts = np.zeros(spec.num_buckets)
        for i, t in enumerate(tokens[start:stop]):  # a running majority that restarts at the switch
            part.majority[i] = int(counts.argmax()) if counts.any() else int(pred.majority[start])
            counts[spec.bucket_of(int(t))] += 1
        out.append({"segment": name, **score_stream(part, tokens[start:stop], spec, every).as_dict()})
    return out


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def markdown(results: list[dict]) -> str:
    """The docs' tables: single streams, AlpacaEval per model, switching streams; modes side by side."""
    head = ("| stream | mode | n | acc | run. majority | acc 500+ | maj. 500+ | tau | tau 500+ | MAE | maj. MAE "
            "| passes majority at | serves (bucket / score) |\n|" + "---|" * 13)
    order = {"prior": 0, "online": 1, "probe": 2}
    groups = {"Single streams": [], "AlpacaEval, one stream per model": [], "Streams that switch": []}
    for r in results:
        key = ("Streams that switch" if r["stream"].startswith("switch") else
               "AlpacaEval, one stream per model" if r["stream"].startswith("alpaca") else "Single streams")
        groups[key].append(r)
    out = []
    for title, rows in groups.items():
        rows.sort(key=lambda r: (r["stream"], r.get("segment", ""), order.get(r["mode"], 9)))
        lines = [f"**{title}**\n", head]
        for r in rows:
            name = r["stream"].removeprefix("switch:") + (f" → **{r['segment']}**" if "segment" in r else "")
            lines.append(" | ".join([
                f"| {name}", r["mode"], str(r["examples"]), _f(r["accuracy"]), _f(r["majority_accuracy"]),
                _f(r["accuracy_after"]), _f(r["majority_accuracy_after"]), _f(r["kendall_tau"]),
                _f(r["kendall_tau_after"]), _f(r["mae_tokens"], 0), _f(r["majority_mae_tokens"], 0),
                _f(r["passes_majority_at"]), f"{r['final_bucket_source']} / {r['final_score_source']} |"]))
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default=None, metavar="JSON", help="print the markdown tables of a results file")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--out", default=str(Path(__file__).with_name("online_eval.json")))
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--modes", default="prior,online,probe")
    ap.add_argument("--alpaca-models", type=int, default=16)
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    torch.set_num_threads(1)
    root = Path(args.data_root)
    meta = read_meta(DEFAULT_DIR)
    spec, shares = meta.buckets, np.array(meta.training["label_shares"])
    label_tok = load_tokenizer(DEFAULT_DIR / meta.label_tokenizer)
    prior = PriorFeaturizer(load_predictor())

    streams: dict[str, list[LengthExample]] = {"sharegpt": split_examples(sharegpt_examples(root / "sharegpt-v3-partial"))["test"]}
    alpaca = alpaca_by_model(root)
    for model in sorted(alpaca)[: args.alpaca_models]:
        streams[f"alpaca:{model}"] = shuffled(alpaca[model])
    streams["gsm8k"] = shuffled(gsm8k_examples(root / "gsm8k"))
    streams["mt-bench"] = mt_bench(root)
    switches = {
        "switch:sharegpt>alpaca:gpt4_1106_preview>gsm8k": [("sharegpt", 1000), ("alpaca:gpt4_1106_preview", None),
                                                           ("gsm8k", None)],
        "switch:alpaca:alpaca-7b>alpaca:gpt4_1106_preview": [("alpaca:alpaca-7b", None),
                                                             ("alpaca:gpt4_1106_preview", None)],
    }

    tokens = {name: label_tokens(ex, label_tok) for name, ex in streams.items()}
    featurizers = {"prior": prior, "online": prior}
    if "probe" in args.modes:
        featurizers["probe"] = TinyProbe(prior, label_tok.get_vocab_size())
    results = []
    for mode in args.modes.split(","):
        rows = {}
        for name, examples in streams.items():
            t0 = time.time()
            rows[name] = featurize_all(featurizers[mode], [ex.prompt for ex in examples])
            every = 0 if mode == "prior" else args.every
            pred = run_stream(rows[name], tokens[name], spec, every, shares, OnlineConfig(refit_every=max(every, 1)))
            report = score_stream(pred, tokens[name], spec, every).as_dict()
            results.append({"stream": name, "mode": mode, "seconds": round(time.time() - t0, 1), **report})
            print(json.dumps(results[-1]), flush=True)
        for name, parts in switches.items():
            picked = [(b, b, n or len(tokens[b])) for b, n in parts]  # (label, stream, examples taken)
            cat = Featured(*(np.concatenate([getattr(rows[b], f)[:n] for _, b, n in picked])
                             for f in ("features", "probs", "score")))
            tok = np.concatenate([tokens[b][:n] for _, b, n in picked])
            bounds, start = [], 0
            for label, _, n in picked:
                bounds.append((label, start, start + n))
                start += n
            every = 0 if mode == "prior" else args.every
            pred = run_stream(cat, tok, spec, every, shares, OnlineConfig(refit_every=max(every, 1)))
            for seg in segment_report(pred, tok, bounds, spec, every):
                results.append({"stream": name, "mode": mode, **seg})
                print(json.dumps(results[-1]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
