"""Draws docs/figures/roofline-cost-model.png. Run from the repo root:
python docs/figures/make_roofline_figure.py
"""

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tetriinfer.sim.cost import RooflineCostModel

setups = [("v100", "opt-13b", 1), ("a100", "llama3-8b", 1), ("h100", "llama3-8b", 1), ("h100", "llama3-70b", 4)]
chunks = [2**k for k in range(4, 15)]
figure = Figure(figsize=(10, 4), layout="constrained")
FigureCanvasAgg(figure)
left, right = figure.subplots(1, 2)
for gpu, model, tp in setups:
    cost = RooflineCostModel.from_names(gpu, model, tp=tp)
    throughput = [n / cost.step_time(n, 0, 0, 0) for n in chunks]
    label = f"{gpu} {model}" + (f" tp{tp}" if tp > 1 else "")
    left.plot(chunks, [t / max(throughput) for t in throughput], marker=".", label=label)
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    right.plot(batches, [cost.step_time(0, 0, b, b * 1024) * 1e3 for b in batches], marker=".", label=label)
left.axvline(512, color="grey", ls=":", lw=1)
left.set(xscale="log", xlabel="prefill chunk tokens", ylabel="throughput / its peak (one prompt per chunk)",
         title="Prefill saturation (roofline)")
right.set(xscale="log", yscale="log", xlabel="decode batch (1024 context each)", ylabel="step time (ms)",
          title="Decode step time (roofline)")
for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
figure.savefig("docs/figures/roofline-cost-model.png", dpi=110)
