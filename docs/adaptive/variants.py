"""Adaptive TetriInfer's policy knobs against the colocated baselines, on a slice of the sweep
(2 and 8 GPUs, H100 and H200, 0.3 and 0.9 of capacity, Poisson, every workload but the Splitwise
copies, 400 requests per cell): does a later hand-off or another interference weight help?

    python docs/adaptive/variants.py        # about 5 minutes on 2 cores; prints one line per variant
"""

from __future__ import annotations

import sys
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import experiments  # noqa: E402

VARIANTS = {  # name -> PolicyConfig overrides of adaptive TetriInfer
    "default (hand-off after 8)": {},
    "hand-off after 64": {"handoff_after_tokens": 64},
    "never hand off": {"handoff_after_tokens": 10**6},
    "interference weight 0.5": {"interference_weight": 0.5},
    "interference weight 0": {"interference_weight": 0.0},
}


def main() -> None:
    experiments.SYSTEMS = {"vllm": ("vllm", {}), "sarathi": ("sarathi", {}),
                           **{name: ("tetriinfer", policy) for name, policy in VARIANTS.items()}}
    cells = [c for c in experiments.cells(400) if c[1] in (2, 8) and c[4] in (0.3, 0.9) and c[3] == "poisson"
             and not c[2].startswith("splitwise")]
    with Pool(2) as pool:
        rows = pool.map(experiments.run_cell, cells)
    experiments.print_variants(rows, VARIANTS)


if __name__ == "__main__":
    main()
