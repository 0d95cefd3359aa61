"""Reports over run summaries: the systems-side-by-side table and the TTFT/JCT CDF plot (the
metrics themselves are `tetriinfer.metrics`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tetriinfer.metrics import RequestRecord, Summary, perf_per_dollar


def format_table(named_summaries: dict[str, Summary], baseline: str | None = None) -> str:
    """Systems side by side, one metric per row; latencies in ms. perf/$ is relative to `baseline`
    (default: the first system)."""
    names = list(named_summaries)
    if not names:
        return ""
    summaries = list(named_summaries.values())
    base = named_summaries[baseline if baseline is not None else names[0]]
    rows: list[tuple[str, list[str]]] = [("requests", [str(s.num_requests) for s in summaries])]
    for label, attr in (("TTFT", "ttft"), ("TPOT", "tpot"), ("JCT", "jct")):
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append((f"{label} {stat} (ms)", [_number(getattr(getattr(s, attr), stat) * 1e3) for s in summaries]))
    rows += [
        ("makespan (s)", [_number(s.makespan_s) for s in summaries]),
        ("throughput (req/s)", [_number(s.throughput_rps) for s in summaries]),
        ("output tokens/s", [_number(s.output_tokens_per_s) for s in summaries]),
        ("resource time (s)", [_number(s.resource_time_s) for s in summaries]),
        ("perf/$ (x)", [_number(perf_per_dollar(s, base)) for s in summaries]),
        ("SLO attainment", [_number(s.slo_attainment) for s in summaries]),
        ("goodput (req/s)", [_number(s.goodput_rps) for s in summaries]),
    ]
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(name), *(len(cells[i]) for _, cells in rows)) for i, name in enumerate(names)]
    lines = ["  ".join([" " * label_width] + [name.rjust(w) for name, w in zip(names, widths)])]
    for label, cells in rows:
        lines.append("  ".join([label.ljust(label_width)] + [cell.rjust(w) for cell, w in zip(cells, widths)]))
    return "\n".join(lines)


def _number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


PLOT_EXTRA = "pip install 'tetriinfer[plot]'"


def save_plot(draw, path: str | Path, *, asked: bool = True) -> bool:
    """`draw(path)` (which imports matplotlib), and a line saying where the plot went. matplotlib is
    an extra: without it, a plot the user asked for is a ValueError naming the extra (the CLI prints
    it as a one-line error), and a default one is skipped with a line saying how to get it."""
    try:
        draw(path)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "matplotlib":
            raise
        if asked:
            raise ValueError(f"drawing {path} needs matplotlib: {PLOT_EXTRA}") from None
        print(f"no plot: matplotlib is not installed ({PLOT_EXTRA})")
        return False
    print(f"wrote {path}")
    return True


def plot_distributions(named_records: dict[str, list[RequestRecord]], path: str | Path) -> None:
    """TTFT and JCT CDFs, one line per system, side by side in one image at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas, without touching pyplot's global backend
    axes = figure.subplots(1, 2)
    for ax, (title, metric) in zip(axes, (("TTFT", "ttft_s"), ("JCT", "jct_s"))):
        for name, records in named_records.items():
            values = np.sort([getattr(r, metric) for r in records])
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), drawstyle="steps-post", label=name)
        ax.set_xlabel(f"{title} (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF")
        ax.grid(alpha=0.3)
        ax.legend()
    figure.savefig(path, dpi=120)
