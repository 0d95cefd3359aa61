"""The scheduling value of the online predictor, in the simulator (docs/predictor.md, last table).

    python docs/predictor/sim_value.py --data-root ../shared/data --out docs/predictor/sim_value.json

Requests: AlpacaEval answers of all 16 models, pooled and shuffled (a distribution the shipped
predictor never saw), lengths in the predictor's tokens, Poisson arrivals. Adaptive TetriInfer
(the default policy) on 2 prefill + 4 decode H100s serving Llama-3-8B (roofline), with lengths from:
- oracle: the dispatcher knows every true length (dispatch policy `oracle`);
- online: the online learner replayed over the stream (predictor.sim_replay.ReplayPredictor);
- prior: the shipped model alone;
- none: every request the prior's majority bucket (what `--predictor none` serves).
`--dispatch` sets the other three runs' dispatch policy (default: the adaptive policy's, least_loaded);
`--predictor DIR` replays another prior.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from online_eval import alpaca_by_model, shuffled  # noqa: E402

from tetriinfer.config import ClusterConfig, ClusterShape, PolicyConfig, SimConfig  # noqa: E402
from tetriinfer.predictor.artifact import DEFAULT_DIR, read_meta  # noqa: E402
from tetriinfer.predictor.learner import Featured  # noqa: E402
from tetriinfer.predictor.online import PriorFeaturizer  # noqa: E402
from tetriinfer.predictor.prequential import featurize_all  # noqa: E402
from tetriinfer.predictor.serving import load_predictor  # noqa: E402
from tetriinfer.predictor.sim_replay import ReplayPredictor, specs_from_examples  # noqa: E402
from tetriinfer.predictor.tokenizer import count_tokens, load_tokenizer  # noqa: E402
from tetriinfer.predictor.train import label_tokens  # noqa: E402
from tetriinfer.sim.cluster import simulate  # noqa: E402
from tetriinfer.sim.cost import RooflineCostModel  # noqa: E402


def table(path: str) -> str:
    d = json.loads(Path(path).read_text())
    dispatch = f", dispatch {d['dispatch']}" if "dispatch" in d else ""
    lines = [f"{d['requests']} requests at {d['rate']:g} req/s, {d['prefill']} prefill + {d['decode']} decode, "
             f"mean output {d['mean_output_tokens']:.0f} tokens{dispatch}\n",
             "| lengths from | bucket acc | JCT mean (s) | JCT p90 | JCT p99 | TPOT mean (ms) | TPOT p90 | TTFT p90 (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for k in ("oracle", "online", "prior", "none"):
        s, a = d[k], d[k]["bucket_accuracy"]
        lines.append(f"| {k} | {'exact' if a is None else f'{a:.3f}'} | {s['jct']['mean']:.2f} | {s['jct']['p90']:.2f} "
                     f"| {s['jct']['p99']:.2f} | {1000 * s['tpot']['mean']:.2f} | {1000 * s['tpot']['p90']:.2f} "
                     f"| {1000 * s['ttft']['p90']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default=None, metavar="JSON", help="print the markdown table of a results file")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--out", default=str(Path(__file__).with_name("sim_value.json")))
    ap.add_argument("--num-requests", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=24.0)
    ap.add_argument("--prefill", type=int, default=2)
    ap.add_argument("--decode", type=int, default=4)
    ap.add_argument("--predictor", default=str(DEFAULT_DIR), metavar="DIR",
                    help="the prior (default: the shipped model)")
    ap.add_argument("--dispatch", default=None, help="dispatch policy of the online/prior/none runs "
                    "(default: the adaptive policy's, least_loaded; power2 is the paper's heavy/light mixing)")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    torch.set_num_threads(1)
    prior_dir = Path(args.predictor)
    meta = read_meta(prior_dir)
    spec, shares = meta.buckets, np.array(meta.training["label_shares"])
    tok = load_tokenizer(prior_dir / meta.label_tokenizer)
    examples = shuffled([ex for exs in alpaca_by_model(Path(args.data_root)).values() for ex in exs])[: args.num_requests]
    outputs = label_tokens(examples, tok)
    prompts = np.array(count_tokens(tok, [ex.prompt for ex in examples]))
    rows = featurize_all(PriorFeaturizer(load_predictor(str(prior_dir))), [ex.prompt for ex in examples])
    constant = np.zeros_like(rows.probs)
    constant[:, meta.majority_bucket] = 1.0
    specs = specs_from_examples(prompts, outputs, args.rate)
    cost = RooflineCostModel.from_names("h100", "llama3-8b", 1)
    dispatch = PolicyConfig(dispatch_policy=args.dispatch)
    runs = {
        "oracle": (PolicyConfig(dispatch_policy="oracle"), None),
        "online": (dispatch, ReplayPredictor(rows, outputs, spec, prior_shares=shares)),
        "prior": (dispatch, ReplayPredictor(rows, outputs, spec, learn=False)),
        "none": (dispatch, ReplayPredictor(Featured(rows.features, constant, np.zeros(len(outputs))),
                                           outputs, spec, learn=False)),
    }
    report = {"requests": len(specs), "rate": args.rate, "prefill": args.prefill, "decode": args.decode,
              "dispatch": dispatch.dispatch_policy,
              "prior_model": "shipped" if prior_dir == DEFAULT_DIR else str(prior_dir),
              "mean_output_tokens": float(outputs.mean())}
    for name, (policy, predictor) in runs.items():
        config = SimConfig(ClusterConfig(system="tetriinfer", shape=ClusterShape(args.prefill, args.decode)), policy)
        result = simulate(specs, config, cost, predictor=predictor)
        summary = dataclasses.asdict(result.summary())
        summary["bucket_accuracy"] = None if predictor is None else predictor.accuracy()
        report[name] = summary
        print(name, {k: summary[k] for k in ("makespan_s", "jct", "tpot", "ttft", "bucket_accuracy")}, flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
