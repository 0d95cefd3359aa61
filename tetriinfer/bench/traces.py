"""Vidur / Sarathi-Serve "processed_traces" (`vidur-traces/` in the data folder).

Columns `num_prefill_tokens,num_decode_tokens` (Llama-2 tokenizer: already tokens), plus `arrived_at`
(seconds from the first request) in the Splitwise files, which are the Azure 2023 traces.
"""

from __future__ import annotations

import csv
import functools
import gzip
from pathlib import Path

VIDUR_DIR = "vidur-traces"
# Timed: `arrived_at` per row, replayed by `trace` arrival like the Azure traces.
SPLITWISE_TRACES = {"splitwise-code": "splitwise_code.csv", "splitwise-conv": "splitwise_conv.csv"}
# Lengths only: rows are drawn at random, arrivals come from a rule.
LENGTH_TRACES = {
    "vidur-arxiv": "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
    "vidur-sharegpt": "sharegpt_8k_filtered_stats_llama2_tokenizer.csv",
    "vidur-bwb": "bwb_stats_llama2_tokenizer_filtered_v2.csv",
}


def open_text(path: Path):
    """A data file as text, read through gzip when its name ends in `.gz` (as shipped)."""
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")


# Parsed once per process, keyed by path (a changed data folder is re-read).
@functools.cache
def read_vidur_csv(path: Path) -> tuple[tuple[float | None, int, int], ...]:
    """(arrived_at, or None in a lengths-only file; prompt tokens; output tokens) per row, in order."""
    with open_text(path) as f:
        return tuple(
            (
                float(row["arrived_at"]) if "arrived_at" in row else None,
                int(row["num_prefill_tokens"]),
                int(row["num_decode_tokens"]),
            )
            for row in csv.DictReader(f)
        )
