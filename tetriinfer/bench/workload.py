"""Request streams for benchmarks and the simulator: lengths from real data, arrivals by a rule.

Workloads (docs/workloads.md):
- `lpld`, `lphd`, `hpld`, `hphd`: the paper's four classes of ShareGPT human->gpt pairs (light/heavy
  prompt: <= / > 512 tokens; light/heavy decode: <= / > 128 tokens); `mixed`: a quarter of each.
- `azure-code`, `azure-conv`: the Azure LLM inference traces of 2023, in recorded order;
  `splitwise-code`, `splitwise-conv`: the same traces as Vidur ships them (traces.py).
- `vidur-arxiv`, `vidur-sharegpt`, `vidur-bwb`: Vidur's lengths-only traces, rows drawn at random.
- `conversation`: multi-turn ShareGPT sessions, each turn resending the history (conversation.py).
Arrivals: `closed` (all at t=0: the paper's batch), `poisson` or `bursty` (at `rate` requests/s;
arrivals.py) or `trace` (the timed traces' timestamps, rebased to 0). `load_trace` reads a user's
trace file in any layout trace_files.py knows (ours, Azure, BurstGPT, Vidur CSV; Mooncake JSONL).
Prefix block ids (`RequestSpec.hash_ids`) come with Mooncake traces and the `conversation` workload.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from tetriinfer.bench.arrivals import OPEN_ARRIVALS, check_rate, open_arrivals, poisson_arrivals  # noqa: F401 (re-exported)
from tetriinfer.bench.conversation import plan_conversations, turn_hash_ids
from tetriinfer.bench.trace_files import read_trace
from tetriinfer.bench.traces import (
    HASH_BLOCK_TOKENS, LENGTH_TRACES, SPLITWISE_TRACES, VIDUR_DIR, open_text,
)
from tetriinfer.config import PolicyConfig

log = logging.getLogger(__name__)

SHAREGPT_MIXES = ("lpld", "lphd", "hpld", "hphd", "mixed")
AZURE_TRACES = {"azure-code": "AzureLLMInferenceTrace_code.csv", "azure-conv": "AzureLLMInferenceTrace_conv.csv"}
TIMED_TRACES = tuple(AZURE_TRACES) + tuple(SPLITWISE_TRACES)
# Request-level workloads: every one also works as a closed batch.
WORKLOADS = SHAREGPT_MIXES + TIMED_TRACES + tuple(LENGTH_TRACES)
# Session workloads: turns follow each other in time, so they need an open-loop arrival.
SESSION_WORKLOADS = ("conversation",)
ALL_WORKLOADS = WORKLOADS + SESSION_WORKLOADS
ARRIVALS = ("closed", "poisson", "trace", "bursty")

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
    # One id per HASH_BLOCK_TOKENS prompt tokens, equal ids = equal prefix (None: nothing shared).
    hash_ids: tuple[int, ...] | None = None


BUNDLED_DATA = Path(__file__).resolve().parent / "data"  # the lengths and traces, shipped with the package


def data_dir() -> Path:
    """Where the workloads' data is read: $TETRIINFER_DATA_DIR, else the copy shipped in the package
    (`tetriinfer/bench/data`, its README says where each file comes from)."""
    override = os.environ.get(DATA_DIR_ENV)
    path = Path(override) if override else BUNDLED_DATA
    if not path.is_dir():
        raise FileNotFoundError(
            f"data folder {path} not found; point ${DATA_DIR_ENV} at a folder holding "
            f"sharegpt-v3-partial/, azure-llm-2023/ and vidur-traces/ (or unset it to use the shipped copy)"
        )
    return path


def data_file(*parts: str) -> Path:
    """A file of the data folder, as written there or gzip-compressed (`NAME.gz`, as shipped)."""
    path = data_dir().joinpath(*parts)
    zipped = path.with_name(path.name + ".gz")
    return zipped if not path.exists() and zipped.exists() else path


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

    ShareGPT mixes and lengths-only traces draw pairs/rows at random (`seed`), without replacement
    while there are enough. `with_history` makes a mix pair's prompt its whole conversation so far,
    as a chat API resends it, instead of the human turn alone. Timed traces take their first
    `num_requests` rows. `conversation` takes whole sessions (conversation.py). `max_total_tokens`
    drops pairs or rows whose prompt + output exceed it (a model's context), or ends a session there.
    """
    if name not in ALL_WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known workloads: {', '.join(ALL_WORKLOADS)}")
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {ARRIVALS}, got {arrival!r}")
    if name in SESSION_WORKLOADS and arrival not in OPEN_ARRIVALS:
        raise ValueError(
            f"{name} replays multi-turn sessions whose turns follow each other in time, so {arrival} "
            f"arrival is meaningless for it; use poisson or bursty arrival (with rate)"
        )
    if arrival == "trace" and name not in TIMED_TRACES:
        raise ValueError(f"{name} has no timestamps; use closed, poisson or bursty arrival")
    check_rate(arrival, rate)
    rng = random.Random(seed)
    if name in SESSION_WORKLOADS:
        sessions = plan_conversations(sharegpt_sessions(), num_requests, arrival, rate, rng, max_total_tokens)
        turns = sorted(((t, p, o, s) for s, session in enumerate(sessions) for t, p, o in session),
                       key=lambda turn: turn[0])
        return [RequestSpec(i, t, p, o, turn_hash_ids(s, p, HASH_BLOCK_TOKENS)) for i, (t, p, o, s) in enumerate(turns)]

    def fits(p: int, o: int) -> bool:
        return max_total_tokens is None or p + o <= max_total_tokens

    timestamps = None
    if name in SHAREGPT_MIXES:
        pairs = [(p, o) for p, o in sharegpt_pairs(with_history) if fits(p, o)]
        lengths = _draw_mix(name, pairs, num_requests, rng, heavy_prompt_tokens, heavy_decode_tokens)
    elif name in LENGTH_TRACES:
        pool = [(p, o) for p, o in length_trace(name) if fits(p, o)]
        if not pool:
            raise ValueError(f"{name}: no row has prompt + output <= {max_total_tokens} tokens")
        lengths = _sample(pool, num_requests, rng, name)
    else:
        rows = [row for row in timed_trace(name) if fits(row[1], row[2])]
        if len(rows) < num_requests:
            raise ValueError(f"{name} has {len(rows)} usable rows, fewer than num_requests={num_requests}")
        rows = rows[:num_requests]
        lengths = [(p, o) for _, p, o in rows]
        timestamps = [t - rows[0][0] for t, _, _ in rows]

    if arrival == "closed":
        arrivals = [0.0] * num_requests
    elif arrival == "trace":
        arrivals = timestamps
    else:
        arrivals = open_arrivals(num_requests, arrival, rate, rng)
    return [RequestSpec(i, t, p, o) for i, (t, (p, o)) in enumerate(zip(arrivals, lengths))]


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


def _sharegpt_path() -> Path:
    return data_file("sharegpt-v3-partial", "pair_lengths.csv.gz")


def sharegpt_pairs(with_history: bool = False) -> tuple[tuple[int, int], ...]:
    """(prompt tokens, output tokens) of every ShareGPT human->gpt pair with text on both sides."""
    return _read_sharegpt_pairs(_sharegpt_path(), with_history)


def sharegpt_sessions() -> tuple[tuple[tuple[int, int], ...], ...]:
    """Each ShareGPT record's pairs with text on both sides, in turn order, as (prompt tokens with the
    history before it, output tokens): the turns of a chat session."""
    return _read_sharegpt_sessions(_sharegpt_path())


def azure_trace(name: str) -> tuple[tuple[float, int, int], ...]:
    """(seconds since the trace's first request, prompt tokens, output tokens) per row, in order."""
    return _read_trace_rows(data_file("azure-llm-2023", AZURE_TRACES[name]))


def timed_trace(name: str) -> tuple[tuple[float, int, int], ...]:
    """(arrival seconds, prompt tokens, output tokens) per row of an Azure or Splitwise trace, in order."""
    if name in AZURE_TRACES:
        return azure_trace(name)
    return _read_trace_rows(data_file(VIDUR_DIR, SPLITWISE_TRACES[name]))


def length_trace(name: str) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) per row of a lengths-only Vidur trace."""
    return [(p, o) for _, p, o in _read_trace_rows(data_file(VIDUR_DIR, LENGTH_TRACES[name]))]


# Parsed files stay in memory for the process (keyed by path, so a changed data folder is re-read).
@functools.cache
def _read_sharegpt_rows(path: Path) -> tuple[tuple[str, int, int, int, int], ...]:
    """(record id, turn, context chars before, prompt chars, response chars) of the pairs with text
    on both sides, in file order."""
    with open_text(path) as f:
        rows = (
            (r["id"], int(r["turn"]), int(r["context_chars_before"]), int(r["prompt_chars"]), int(r["response_chars"]))
            for r in csv.DictReader(f)
        )
        return tuple(row for row in rows if row[3] and row[4])


@functools.cache
def _read_sharegpt_pairs(path: Path, with_history: bool) -> tuple[tuple[int, int], ...]:
    return tuple(
        (_tokens(prompt + (context if with_history else 0)), _tokens(response))
        for _, _, context, prompt, response in _read_sharegpt_rows(path)
    )


@functools.cache
def _read_sharegpt_sessions(path: Path) -> tuple[tuple[tuple[int, int], ...], ...]:
    sessions: dict[str, list[tuple[int, int, int]]] = {}
    for record, turn, context, prompt, response in _read_sharegpt_rows(path):
        sessions.setdefault(record, []).append((turn, _tokens(context + prompt), _tokens(response)))
    return tuple(tuple((p, o) for _, p, o in sorted(turns)) for turns in sessions.values())


@functools.cache
def _read_trace_rows(path: Path) -> tuple[tuple[float | None, int, int], ...]:
    """A shipped trace's (arrival or None, prompt tokens, output tokens) rows, parsed once per process."""
    return tuple((t, p, o) for t, p, o, _ in read_trace(path).rows)


def build_specs(
    workload: str,
    num_requests: int,
    *,
    trace: str | None = None,
    rate: float | None = None,
    seed: int = 0,
    max_total_tokens: int | None = None,
    arrival: str | None = None,
) -> list:
    """The requests of `tetriinfer simulate`'s flags: a trace file (`load_trace`), else the named workload
    (`arrival` if given, else Poisson at `rate`; without it a closed batch, or a timed trace's
    timestamps). `max_total_tokens` drops requests whose prompt + output exceed it."""
    if trace:
        return load_trace(trace, arrival=arrival, rate=rate, seed=seed, max_total_tokens=max_total_tokens)
    if arrival is None:
        arrival = "poisson" if rate else ("trace" if workload in TIMED_TRACES else "closed")
    return make_workload(workload, num_requests, seed=seed, arrival=arrival, rate=rate,
                         max_total_tokens=max_total_tokens)


def load_trace(path: str | Path, *, arrival: str | None = None, rate: float | None = None, seed: int = 0,
               max_total_tokens: int | None = None) -> list[RequestSpec]:
    """Every request of a trace file (trace_files.read_trace), renumbered 0..n-1 after dropping those
    over `max_total_tokens`. A timed trace keeps its arrivals; a lengths-only one takes `arrival`
    (Poisson at `rate` when only a rate is given, else a closed batch)."""
    trace = read_trace(path)
    if trace.skipped:
        log.warning("%s: left out %d rows with zero tokens (failed requests)", path, trace.skipped)
    rows = trace.rows
    if max_total_tokens is not None:
        rows = [row for row in rows if row[1] + row[2] <= max_total_tokens]
        if not rows:
            raise ValueError(f"{path}: no row has prompt + output <= {max_total_tokens} tokens")
    if trace.timed:
        if arrival not in (None, "trace"):
            raise ValueError(f"{path} keeps its own arrival times; {arrival} arrival does not apply")
        times = [row[0] for row in rows]
    else:
        if arrival == "trace":
            raise ValueError(f"{path} has no arrival times (lengths only); use closed, poisson or bursty arrival")
        arrival = arrival or ("poisson" if rate else "closed")
        check_rate(arrival, rate)
        times = [0.0] * len(rows) if arrival == "closed" else open_arrivals(len(rows), arrival, rate, random.Random(seed))
    return [RequestSpec(i, t, p, o, h) for i, (t, (_, p, o, h)) in enumerate(zip(times, rows))]


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
