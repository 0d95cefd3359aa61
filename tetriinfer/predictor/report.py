"""Markdown tables from `predictor eval --json` reports (the tables in docs/predictor.md)."""

from __future__ import annotations

from pathlib import Path

from tetriinfer.predictor.artifact import read_meta

COLUMNS = ("model", "train n", "loss", "g", "data", "n", "acc", "majority", "MAE", "maj. MAE", "tau", "tau (bucket)",
           "ms/prompt (b=32)", "ms (b=1)", "train s", "params", "MB")


def _model_size_mb(model_dir: Path) -> float:
    """Bytes of the model's own files (predictor.json, weights, tokenizers), not plots or curves."""
    files = [p for p in model_dir.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".txt")]
    return sum(p.stat().st_size for p in files if p.name != "curves.json") / 2**20


def _fmt(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_row(report: dict) -> list[str]:
    model_dir = Path(report["model"])
    meta = read_meta(model_dir)
    config = meta.training.get("config", {})
    return [
        Path(config.get("model", meta.kind)).name, f"{meta.training.get('train_examples', 0) / 1000:.1f}K",
        config.get("loss", "?"), str(report["granularity"]),
        Path(report["data"]).stem, str(report["examples"]),
        _fmt(report["accuracy"], 3), _fmt(report["majority_accuracy"], 3),
        _fmt(report["mae_tokens"], 0), _fmt(report["majority_mae_tokens"], 0), _fmt(report["kendall_tau"], 3),
        _fmt(report.get("kendall_tau_bucket"), 3),
        _fmt(report["latency_ms_per_prompt_batched"], 2), _fmt(report["latency_ms_single_prompt"], 2),
        _fmt(meta.training.get("train_seconds"), 0), f"{meta.training.get('parameters', 0) / 1e6:.2f}M",
        _fmt(_model_size_mb(model_dir), 1),
    ]


def markdown_table(reports: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(report_row(r)) + " |" for r in reports]
    return "\n".join(lines)


def plot_label_shares(reports: list[dict], path: str | Path) -> None:
    """Bars: the share of replies per bucket in each data set (one bar group per data set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_data = {Path(r["data"]).stem: r for r in reports}  # one report per data set is enough
    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / len(by_data)
    for i, (name, report) in enumerate(by_data.items()):
        shares = report["label_bucket_shares"]
        g = report["granularity"]
        ax.bar([b + i * width for b in range(len(shares))], shares, width, label=name)
    ax.set_xticks([b + 0.4 - width / 2 for b in range(len(shares))])
    ax.set_xticklabels([f"{b * g}-" if b == len(shares) - 1 else f"{b * g}-{(b + 1) * g}" for b in range(len(shares))])
    ax.set_xlabel("reply length bucket (tokens)")
    ax.set_ylabel("share of replies")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
