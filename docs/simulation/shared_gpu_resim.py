"""Simulate saved one-GPU serve-bench runs again, without and with time-slicing of the instances that
share the GPU, and runs served under MPS also with the MPS model (sim/gpu.py): the tables of
docs/simulation.md's "Instances sharing a GPU".

    PYTHONPATH=. python docs/simulation/shared_gpu_resim.py RESULT.json... \
        --profile docs/benchmarks/profile-h100-llama3-8b.json --out docs/benchmarks/sim-shared-gpu-resim.json

(the JSON's `command` is the exact one).

CPU only. Each run's requests are rebuilt from the result's args, as `scripts/serve_bench.py` built
them (checked against the recorded prompt and output lengths), and each system's `serve` flags give
the simulated config; a result without a profile is priced by `--profile`. `--extra-flags
PATH="--policy paper"` adds serve flags to that result's systems: results served before the adaptive
policy existed ran the paper's split, which today's defaults no longer are.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import serve_bench  # noqa: E402  (scripts/ is not a package)


def _err(sim: float, real: float) -> float:
    return round((sim / real - 1) * 100, 1)


def resim_file(path: str, fallback_profile: str | None, extra_flags: list[str]) -> list[dict]:
    saved = json.loads(Path(path).read_text())
    args = argparse.Namespace(**saved["args"])
    profile = args.profile or fallback_profile
    runs = {f"{w}/{a}": specs for w, a, specs in serve_bench.build_runs(args)}
    rows = []
    for name, system in saved["systems"].items():
        if "flags" not in system:
            continue
        flags = system["flags"] + extra_flags
        cfg = serve_bench.serve_config(flags)
        sharing = serve_bench.instances_per_gpu(cfg)
        for key, run in system.get("runs", {}).items():
            if "summary" not in run:
                continue
            specs = {s.request_id: s for s in runs[key]}
            # The rebuilt requests must be the served ones.
            mismatched = {f: sum(getattr(specs[r["request_id"]], f) != r[f] for r in run["records"])
                          for f in ("prompt_tokens", "output_tokens")}
            real = run["summary"]
            unshared = serve_bench._simulate(cfg, runs[key], profile, gpu_sharing=1)
            shared = serve_bench._simulate(cfg, runs[key], profile, sharing_mode="time-slice")
            sims = [("unshared", unshared), ("shared", shared)]
            if cfg.mps_sm_shares is not None and sharing > 1:  # served under MPS: also its model
                sims.append(("mps", serve_bench._simulate(cfg, runs[key], profile, sharing_mode="mps")))
            row = {"result": path, "commit": saved.get("commit"), "device": saved.get("device"), "system": name,
                   "run": key, "flags": " ".join(flags), "mps": cfg.mps_sm_shares is not None,
                   "instances": cfg.total_instances, "instances_per_gpu": sharing, "profile": profile,
                   "requests": len(run["records"]), "mismatched_lengths": mismatched}
            for metric in ("jct", "ttft", "tpot"):
                r = real[metric]["mean"]
                row[metric] = {"real_ms": round(r * 1e3, 1)}
                if "sim" in run:  # what the simulator of that commit said
                    old = run["sim"][metric]["mean"]
                    row[metric]["recorded_sim_ms"] = round(old * 1e3, 1)
                    row[metric]["recorded_sim_err_pct"] = _err(old, r)
                for label, summary in sims:
                    value = getattr(summary, metric).mean
                    row[metric][f"{label}_ms"], row[metric][f"{label}_err_pct"] = round(value * 1e3, 1), _err(value, r)
            rows.append(row)
            mps = f", mps {row['jct']['mps_err_pct']:+.0f}%" if "mps_ms" in row["jct"] else ""
            print(f"{row['result']} {name} {key} x{sharing}: JCT real {row['jct']['real_ms']:.0f} ms, "
                  f"unshared {row['jct']['unshared_err_pct']:+.0f}%, shared {row['jct']['shared_err_pct']:+.0f}%{mps}",
                  flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--profile", default=None, help="for results run without --profile")
    p.add_argument("--extra-flags", action="append", default=[], metavar="PATH=FLAGS",
                   help="serve flags added to every system of that result")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    extra = {path: shlex.split(flags) for path, _, flags in (item.partition("=") for item in args.extra_flags)}
    rows = [row for path in args.results for row in resim_file(path, args.profile, extra.get(path, []))]
    note = ("real: the served run's means; recorded_sim: the simulator of that run's commit; unshared / shared: "
            "this simulator with every instance on its own GPU / time-sliced as serve placed them; mps: runs served "
            "with --mps-sm-shares, side by side on those shares (sim/gpu.py's MPS model); err: vs real")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    Path(args.out).write_text(json.dumps({"command": command, "note": note, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
