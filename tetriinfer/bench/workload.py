"""Request streams for benchmarks and the simulator: lengths from real data, arrivals by a rule.

Workloads (docs/workloads.md):
- `lpld`, `lphd`, `hpld`, `hphd`: the paper's four classes of ShareGPT human->gpt pairs (light/heavy
  prompt: <= / > 512 tokens; light/heavy decode: <= / > 128 tokens); `mixed`: a quarter of each.
- `azure-code`, `azure-conv`: the Azure LLM inference traces of 2023, in recorded order.
Arrivals: `closed` (all at t=0: the paper's batch), `poisson` (at `rate` requests/s) or `trace` (the
Azure timestamps, rebased to 0). `load_trace_csv` reads any `arrival_s,prompt_tokens,output_tokens` CSV.
"""

from __future__ import annotations

import dataclasses

import csv
import functools
import gzip
import os
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tetriinfer.config import PolicyConfig

SHAREGPT_MIXES = ("lpld", "lphd", "hpld", "hphd", "mixed")
AZURE_TRACES = {"azure-code": "AzureLLMInferenceTrace_code.csv", "azure-conv": "AzureLLMInferenceTrace_conv.csv"}
WORKLOADS = SHAREGPT_MIXES + tuple(AZURE_TRACES)
ARRIVALS = ("closed", "poisson", "trace")

# ShareGPT ships characters, not tokens (no tokenizer can be fetched here): ~4 characters per token
# is the usual estimate for English text with a Llama/GPT BPE vocabulary.
CHARS_PER_TOKEN = 4.0

DATA_DIR_ENV = "TETRIINFER_DATA_DIR"


@dataclass(frozen=True)
class RequestSpec:
    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


def data_dir() -> Path:
    """The shared data folder: $TETRIINFER_DATA_DIR, else `<repo>/../shared/data`."""
    override = os.environ.get(DATA_DIR_ENV)
    path = Path(override) if override else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"data folder {path} not found; point ${DATA_DIR_ENV} at the folder holding "
            f"sharegpt-v3-partial/ and azure-llm-2023/"
        )
    return path


def make_workload(
    name: str,
    num_requests: int = 128,
    *,
    seed: int = 0,
    arrival: str = "closed",
    rate: float | None = None,
    heavy_prompt_tokens: int = PolicyConfig.heavy_prompt_tokens,
    heavy_decode_tokens: int = PolicyConfig.heavy_decode_tokens,
    max_total_tokens: int | None = None,
    with_history: bool = False,
) -> list[RequestSpec]:
    """`num_requests` requests of workload `name`, ids 0..n-1 in arrival order.

    ShareGPT mixes draw pairs at random (`seed`), without replacement while the class has enough
    pairs. `with_history` makes a pair's prompt its whole conversation so far, as a chat API resends
    it, instead of the human turn alone. Azure traces take their first `num_requests` rows.
    `max_total_tokens` drops pairs or rows whose prompt + output exceed it (a model's context).
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {ARRIVALS}, got {arrival!r}")
    if arrival == "poisson" and (rate is None or rate <= 0):
        raise ValueError(f"poisson arrival needs rate > 0 requests/s, got {rate}")
    rng = random.Random(seed)
    if name in SHAREGPT_MIXES:
        if arrival == "trace":
            raise ValueError(f"{name} comes from ShareGPT, which has no timestamps; use closed or poisson arrival")
        pairs = [
            (p, o)
            for p, o in sharegpt_pairs(with_history)
            if max_total_tokens is None or p + o <= max_total_tokens
        ]
        lengths = _draw_mix(name, pairs, num_requests, rng, heavy_prompt_tokens, heavy_decode_tokens)
        timestamps = None
    elif name in AZURE_TRACES:
        rows = [
            row
            for row in azure_trace(name)
            if max_total_tokens is None or row[1] + row[2] <= max_total_tokens
        ]
        if len(rows) < num_requests:
            raise ValueError(f"{name} has {len(rows)} usable rows, fewer than num_requests={num_requests}")
        rows = rows[:num_requests]
        lengths = [(p, o) for _, p, o in rows]
        timestamps = [t - rows[0][0] for t, _, _ in rows]
    else:
        raise ValueError(f"unknown workload {name!r}; known workloads: {', '.join(WORKLOADS)}")

    if arrival == "closed":
        arrivals = [0.0] * num_requests
    elif arrival == "poisson":
        arrivals = poisson_arrivals(num_requests, rate, rng)
    else:
        arrivals = timestamps
    return [RequestSpec(i, t, p, o) for i, (t, (p, o)) in enumerate(zip(arrivals, lengths))]


def poisson_arrivals(num_requests: int, rate: float, rng: random.Random) -> list[float]:
    """Arrival times of a Poisson process at `rate` per second; the first request opens at t=0."""
    times, now = [], 0.0
    for _ in range(num_requests):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def classify(prompt_tokens: int, output_tokens: int, heavy_prompt_tokens: int, heavy_decode_tokens: int) -> str:
    """The paper's class of a request: lpld, lphd, hpld or hphd."""
    prompt = "hp" if prompt_tokens > heavy_prompt_tokens else "lp"
    decode = "hd" if output_tokens > heavy_decode_tokens else "ld"
    return prompt + decode


def _draw_mix(
    name: str,
    pairs: list[tuple[int, int]],
    num_requests: int,
    rng: random.Random,
    heavy_prompt_tokens: int,
    heavy_decode_tokens: int,
) -> list[tuple[int, int]]:
    by_class: dict[str, list[tuple[int, int]]] = {c: [] for c in SHAREGPT_MIXES[:4]}
    for p, o in pairs:
        by_class[classify(p, o, heavy_prompt_tokens, heavy_decode_tokens)].append((p, o))
    if name != "mixed":
        return _sample(by_class[name], num_requests, rng, name)
    counts = [num_requests // 4 + (1 if i < num_requests % 4 else 0) for i in range(4)]
    drawn = [pair for c, n in zip(by_class, counts) for pair in _sample(by_class[c], n, rng, c)]
    rng.shuffle(drawn)
    return drawn


def _sample(pool: list[tuple[int, int]], n: int, rng: random.Random, label: str) -> list[tuple[int, int]]:
    if not pool:
        raise ValueError(f"no ShareGPT pair falls in class {label} under these thresholds")
    return rng.sample(pool, n) if n <= len(pool) else rng.choices(pool, k=n)


def _tokens(chars: int) -> int:
    return max(1, round(chars / CHARS_PER_TOKEN))


def sharegpt_pairs(with_history: bool = False) -> tuple[tuple[int, int], ...]:
    """(prompt tokens, output tokens) of every ShareGPT human->gpt pair with text on both sides."""
    return _read_sharegpt_pairs(data_dir() / "sharegpt-v3-partial" / "pair_lengths.csv.gz", with_history)


def azure_trace(name: str) -> tuple[tuple[float, int, int], ...]:
    """(seconds since the trace's first request, prompt tokens, output tokens) per row, in order."""
    return _read_azure_trace(data_dir() / "azure-llm-2023" / AZURE_TRACES[name])


# Parsed files stay in memory for the process (keyed by path, so a changed data folder is re-read).
@functools.cache
def _read_sharegpt_pairs(path: Path, with_history: bool) -> tuple[tuple[int, int], ...]:
    pairs = []
    with gzip.open(path, "rt", newline="") as f:
        for row in csv.DictReader(f):
            prompt_chars = int(row["prompt_chars"])
            response_chars = int(row["response_chars"])
            if prompt_chars == 0 or response_chars == 0:
                continue
            if with_history:
                prompt_chars += int(row["context_chars_before"])
            pairs.append((_tokens(prompt_chars), _tokens(response_chars)))
    return tuple(pairs)


@functools.cache
def _read_azure_trace(path: Path) -> tuple[tuple[float, int, int], ...]:
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append((_epoch_seconds(row["TIMESTAMP"]), int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    start = rows[0][0]
    return tuple((t - start, p, o) for t, p, o in rows)


_EPOCH = datetime(1970, 1, 1)  # the trace's clock has no time zone; only differences matter


def _epoch_seconds(stamp: str) -> float:
    """`2023-11-16 18:17:03.9799600` (7 fractional digits) as seconds, to the microsecond."""
    whole, _, fraction = stamp.partition(".")
    return (datetime.fromisoformat(whole) - _EPOCH).total_seconds() + float("0." + (fraction or "0"))


TRACE_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


def load_trace_csv(path: str | Path) -> list[RequestSpec]:
    """Requests from a CSV with header `arrival_s,prompt_tokens,output_tokens` (more columns ignored).

    Arrivals are seconds, non-decreasing, kept as written; token counts are integers >= 1. A bad row
    raises ValueError naming the file and line.
    """
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: header must name {','.join(TRACE_COLUMNS)}; missing {', '.join(missing)} "
                f"(header read: {reader.fieldnames})"
            )
        requests: list[RequestSpec] = []
        for row in reader:
            line = reader.line_num
            try:
                arrival = float(row["arrival_s"])
                prompt, output = int(row["prompt_tokens"]), int(row["output_tokens"])
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}:{line}: expected a number and two integers, got "
                    f"{row['arrival_s']!r}, {row['prompt_tokens']!r}, {row['output_tokens']!r}"
                ) from None
            if not arrival >= 0 or prompt < 1 or output < 1:
                raise ValueError(
                    f"{path}:{line}: need arrival_s >= 0 and token counts >= 1, got {arrival}, {prompt}, {output}"
                )
            if requests and arrival < requests[-1].arrival_s:
                raise ValueError(
                    f"{path}:{line}: arrival_s {arrival} is earlier than the previous row's "
                    f"{requests[-1].arrival_s}; sort the file by arrival_s"
                )
            requests.append(RequestSpec(len(requests), arrival, prompt, output))
    if not requests:
        raise ValueError(f"{path}: no requests after the header")
    return requests


def build_specs(
    workload: str,
    num_requests: int,
    *,
    trace: str | None = None,
    rate: float | None = None,
    seed: int = 0,
    max_total_tokens: int | None = None,
) -> list:
    """The requests of `tetriinfer simulate`'s flags: a trace CSV as written, else the named workload
    (Poisson at `rate`; without it a closed batch, or the Azure timestamps). `max_total_tokens` drops
    requests whose prompt + output exceed it (trace CSV rows too; the rest are renumbered 0..n-1)."""
    if trace:
        specs = load_trace_csv(trace)
        if max_total_tokens is not None:
            kept = [s for s in specs if s.prompt_tokens + s.output_tokens <= max_total_tokens]
            if not kept:
                raise ValueError(f"{trace}: no row has prompt + output <= {max_total_tokens} tokens")
            specs = [dataclasses.replace(s, request_id=i) for i, s in enumerate(kept)]
        return specs
    azure = workload.startswith("azure")
    arrival = "poisson" if rate else ("trace" if azure else "closed")
    return make_workload(workload, num_requests, seed=seed, arrival=arrival, rate=rate,
                         max_total_tokens=max_total_tokens)


def back_to_back(*phases: list[RequestSpec]) -> list[RequestSpec]:
    """One workload whose phases follow each other (e.g. LPHD, then HPLD: the mix shifts, which is
    when a flip pays): each phase's arrivals start where the previous phase's ended; ids run on."""
    out: list[RequestSpec] = []
    offset = 0.0
    for phase in phases:
        start = min((s.arrival_s for s in phase), default=0.0)
        for spec in phase:
            out.append(dataclasses.replace(spec, request_id=len(out), arrival_s=offset + spec.arrival_s - start))
        offset = out[-1].arrival_s if out else offset
    return out
