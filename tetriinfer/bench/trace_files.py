"""Trace files a user passes with `--trace`: the public layouts, recognised by their header.

CSV layouts (`TRACE_LAYOUTS`), a `.gz` name read through gzip:
- ours: `arrival_s,prompt_tokens,output_tokens` (seconds as written);
- Azure LLM inference traces, 2023 and 2024: `TIMESTAMP,ContextTokens,GeneratedTokens` (a wall
  clock, with or without a time zone, rebased to the first row);
- BurstGPT: `Timestamp,...,Request tokens,Response tokens,...` (seconds);
- Vidur / Splitwise: `num_prefill_tokens,num_decode_tokens`, with `arrived_at` (seconds) or
  without (lengths only: the caller draws arrivals).
JSONL (`.jsonl`, `.jsonl.gz`): Mooncake's traces (traces.read_mooncake_jsonl), prefix hash ids kept.

Our own layout is strict: every row must be a request. The public traces also log failed requests
with zero tokens (BurstGPT, Azure 2024); those rows are left out and counted in `skipped`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from tetriinfer.bench.traces import open_text, read_mooncake_jsonl

TRACE_FORMATS = (
    "a CSV trace: ours (arrival_s,prompt_tokens,output_tokens), Azure's (TIMESTAMP,ContextTokens,"
    "GeneratedTokens), BurstGPT's (Timestamp,Request tokens,Response tokens) or Vidur's ([arrived_at,]"
    "num_prefill_tokens,num_decode_tokens); or a Mooncake JSONL trace (timestamp ms, input_length, "
    "output_length, hash_ids); .gz names are read compressed"
)

_EPOCH = datetime(1970, 1, 1)
_STAMP = re.compile(r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(\.\d+)?\s*(Z|[+-]\d\d:?\d\d)?")


def wall_clock_seconds(stamp: str) -> float:
    """`2023-11-16 18:17:03.9799600` or `2024-05-10 00:00:00.009930+00:00` as seconds since 1970 (UTC
    when a zone is given), to the microsecond; any number of fractional digits."""
    match = _STAMP.fullmatch(stamp.strip())
    if match is None:
        raise ValueError(f"not a timestamp: {stamp!r}")
    whole, fraction, zone = match.groups()
    seconds = (datetime.fromisoformat(whole.replace("T", " ")) - _EPOCH).total_seconds()
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        hours, minutes = int(zone[1:3]), int(zone[-2:])
        seconds -= sign * timedelta(hours=hours, minutes=minutes).total_seconds()
    return seconds + float(fraction or 0.0)


@dataclass(frozen=True)
class CsvLayout:
    """Where a CSV trace keeps a request's arrival and lengths."""

    name: str
    prompt: str
    output: str
    arrival: str | None  # None: lengths only
    clock: Callable[[str], float] = float  # the arrival cell, as seconds
    rebase: bool = False  # a wall clock: arrivals count from the first row
    skip_empty: bool = True  # rows logging a failed request (zero tokens) are left out


TRACE_LAYOUTS = (
    CsvLayout("ours", "prompt_tokens", "output_tokens", "arrival_s", skip_empty=False),
    CsvLayout("azure", "ContextTokens", "GeneratedTokens", "TIMESTAMP", wall_clock_seconds, rebase=True),
    CsvLayout("burstgpt", "Request tokens", "Response tokens", "Timestamp"),
    CsvLayout("vidur", "num_prefill_tokens", "num_decode_tokens", "arrived_at"),
    CsvLayout("vidur lengths", "num_prefill_tokens", "num_decode_tokens", None),
)


@dataclass(frozen=True)
class TraceRows:
    """A trace file's requests in file order: (arrival seconds or None, prompt tokens, output tokens,
    prefix hash ids or None)."""

    layout: str
    rows: list[tuple[float | None, int, int, tuple[int, ...] | None]]
    skipped: int = 0  # failed requests left out

    @property
    def timed(self) -> bool:
        return self.rows[0][0] is not None


def read_trace(path: str | Path) -> TraceRows:
    """Every request of a trace file. A bad row raises ValueError naming `file:line`."""
    path = Path(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return TraceRows("mooncake", [(t, p, o, h or None) for t, p, o, h in read_mooncake_jsonl(path)])
    with open_text(path) as f:
        reader = csv.DictReader(f)
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        layout = _layout_of(path, header)
        rows, skipped = _read_rows(path, reader, layout)
    if not rows:
        raise ValueError(f"{path}: no requests after the header" + (f" ({skipped} rows with zero tokens)" if skipped else ""))
    if layout.rebase:
        start = rows[0][0]
        rows = [(t - start, p, o, h) for t, p, o, h in rows]
    return TraceRows(layout.name, rows, skipped)


def _layout_of(path: Path, header: list[str]) -> CsvLayout:
    for layout in TRACE_LAYOUTS:
        if all(column in header for column in (layout.prompt, layout.output, layout.arrival) if column):
            return layout
    raise ValueError(f"{path}: unknown trace header {header}; expected {TRACE_FORMATS}")


def _read_rows(path: Path, reader: csv.DictReader, layout: CsvLayout):
    rows: list[tuple[float | None, int, int, None]] = []
    skipped = 0
    for row in reader:
        line = reader.line_num
        cells = [row.get(c) for c in (layout.arrival, layout.prompt, layout.output) if c]
        try:
            arrival = layout.clock(row[layout.arrival]) if layout.arrival else None
            prompt, output = int(row[layout.prompt]), int(row[layout.output])
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{line}: expected {'a time and ' if layout.arrival else ''}two integers "
                             f"in {layout.name} columns, got {', '.join(map(repr, cells))}") from None
        if layout.skip_empty and (prompt == 0 or output == 0):
            skipped += 1
            continue
        if (arrival is not None and not arrival >= 0 and not layout.rebase) or prompt < 1 or output < 1:
            raise ValueError(f"{path}:{line}: need arrivals >= 0 and token counts >= 1, got {', '.join(cells)}")
        if arrival is not None and rows and arrival < rows[-1][0]:
            raise ValueError(f"{path}:{line}: arrival {cells[0]} is earlier than the previous row's; "
                             f"sort the file by {layout.arrival}")
        rows.append((arrival, prompt, output, None))
    return rows, skipped
