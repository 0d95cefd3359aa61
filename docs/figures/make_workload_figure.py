"""Draws docs/figures/workload-lengths.png. Run from the repo root:
python docs/figures/make_workload_figure.py
"""

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tetriinfer.bench.workload import WORKLOADS, make_workload

figure = Figure(figsize=(10, 4), layout="constrained")
FigureCanvasAgg(figure)
prompt_ax, output_ax = figure.subplots(1, 2)
for name in WORKLOADS:
    requests = make_workload(name, 2000 if name.startswith("azure") else 4000, seed=0)
    prompts, outputs = [r.prompt_tokens for r in requests], [r.output_tokens for r in requests]
    for ax, values in ((prompt_ax, np.sort(prompts)), (output_ax, np.sort(outputs))):
        ax.plot(values, np.arange(1, len(values) + 1) / len(values), drawstyle="steps-post", label=name)
for ax, what, threshold in ((prompt_ax, "prompt", 512), (output_ax, "output", 128)):
    ax.axvline(threshold, color="grey", ls=":", lw=1)
    ax.set(xscale="log", xlabel=f"{what} tokens", ylabel="fraction of requests", title=f"{what} length CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
figure.savefig("docs/figures/workload-lengths.png", dpi=110)
