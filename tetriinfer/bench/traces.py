"""Trace readers: Vidur / Sarathi-Serve "processed_traces" and Mooncake's JSONL traces.

Vidur (`vidur-traces/` in the data folder): columns `num_prefill_tokens,num_decode_tokens` (Llama-2
tokenizer: already tokens), plus `arrived_at` (seconds from the first request) in the Splitwise
files, which are the Azure 2023 traces; trace_files.read_trace reads them, as every CSV layout.

Mooncake (`read_mooncake_jsonl`): one JSON object per line with `timestamp` (ms), `input_length`,
`output_length` and `hash_ids`, one id per `HASH_BLOCK_TOKENS` prompt tokens, equal ids meaning a
shared prefix (the format of Mooncake's public traces).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from tetriinfer.config import SimConfig

HASH_BLOCK_TOKENS = SimConfig.hash_block_tokens  # tokens per hash id (Mooncake's traces: 512)

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


def read_mooncake_jsonl(path: str | Path) -> list[tuple[float, int, int, tuple[int, ...]]]:
    """(arrival seconds as written, input tokens, output tokens, hash ids) per line of a Mooncake
    trace, in order. A bad line raises ValueError naming `file:line`."""
    rows: list[tuple[float, int, int, tuple[int, ...]]] = []
    with open_text(Path(path)) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                arrival = float(row["timestamp"]) / 1000.0
                prompt, output = int(row["input_length"]), int(row["output_length"])
                hash_ids = tuple(int(h) for h in row.get("hash_ids") or ())
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: expected timestamp, input_length, output_length and "
                                 f"hash_ids ({type(e).__name__}: {e})") from None
            if not arrival >= 0 or prompt < 1 or output < 1:
                raise ValueError(f"{path}:{line_no}: need timestamp >= 0 and lengths >= 1, got {row}")
            if rows and arrival < rows[-1][0]:
                raise ValueError(f"{path}:{line_no}: timestamp earlier than the previous line's; sort the file")
            rows.append((arrival, prompt, output, hash_ids))
    if not rows:
        raise ValueError(f"{path}: no requests")
    return rows
