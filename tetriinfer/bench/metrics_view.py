"""A running server's /metrics as typed values, for `tetriinfer top`: no I/O, no clock, no drawing.

`parse_snapshot(text, at)` reads one Prometheus text exposition (`tetriinfer serve`'s, see
tetriinfer/server/metrics.py for the names) into a `Snapshot`; `rates(prev, cur)` turns two snapshots'
counters into per-second rates; `histogram_quantile(q, hist)` estimates a quantile from a histogram's
cumulative buckets the way PromQL's histogram_quantile() does (linear within the bucket).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "tetriinfer_"
LATENCIES = ("ttft", "tpot", "jct")  # tetriinfer_{name}_seconds histograms


@dataclass(frozen=True)
class Histogram:
    """Cumulative buckets [(upper bound `le`, observations <= le)], sorted, ending with +Inf."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    sum: float


@dataclass
class InstanceRow:
    instance: str
    role: str
    pid: int | None = None
    running: float = 0.0
    waiting: float = 0.0
    queued_prompt_tokens: float = 0.0
    kv_blocks_used: float = 0.0
    kv_blocks_total: float = 0.0
    kv_blocks_cached: float = 0.0
    kv_transfers: float = 0.0  # counters from here on
    kv_transfer_bytes: float = 0.0
    local_prefills: float = 0.0
    kept_decodes: float = 0.0
    prefix_queried_tokens: float = 0.0
    prefix_hit_tokens: float = 0.0
    draining: bool = False

    @property
    def kv_used_fraction(self) -> float | None:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else None

    @property
    def prefix_hit_rate(self) -> float | None:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else None


@dataclass
class Snapshot:
    at: float  # the caller's clock when the text was read (seconds)
    requests_running: float | None = None
    requests: dict[str, float] = field(default_factory=dict)  # outcome -> count
    output_tokens: float = 0.0  # output tokens of the requests served in full (the histogram's sum)
    latencies: dict[str, Histogram] = field(default_factory=dict)  # "ttft"/"tpot"/"jct"
    flips: float | None = None
    restarts: dict[str, float] | None = None  # what -> count, when the server exposes it
    start_time: float | None = None  # Unix time the server started: process_start_time_seconds, else
    # when its request counter was made (tetriinfer_requests_created); None when neither is exposed
    dead_instances: float | None = None
    instances: list[InstanceRow] = field(default_factory=list)  # by instance id

    @property
    def requests_waiting(self) -> float:
        return sum(row.waiting for row in self.instances)

    @property
    def requests_done(self) -> float:
        return sum(self.requests.values())


@dataclass
class Rates:
    """Per second over [prev.at, cur.at]; None where the counter is missing or went back (a restart)."""

    seconds: float
    requests: float | None
    output_tokens: float | None
    kv_transfers: dict[str, float | None]  # instance -> transfers / s
    kv_bytes: dict[str, float | None]  # instance -> bytes / s


# InstanceRow field -> the sample name after the prefix (counters with their _total)
_INSTANCE_SAMPLES = {
    "running": "num_running", "waiting": "num_waiting", "queued_prompt_tokens": "queued_prompt_tokens",
    "kv_blocks_used": "kv_blocks_used", "kv_blocks_total": "kv_blocks_total", "kv_blocks_cached": "kv_blocks_cached",
    "kv_transfers": "kv_transfers_total", "kv_transfer_bytes": "kv_transfer_bytes_total",
    "local_prefills": "num_local_prefills_total", "kept_decodes": "num_kept_decodes_total",
    "prefix_queried_tokens": "prefix_queried_tokens_total", "prefix_hit_tokens": "prefix_hit_tokens_total",
}


def samples_by_name(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of a Prometheus text: name (as written, `_total`/`_bucket` included) -> [(labels, value)]."""
    out: dict[str, list] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append((dict(sample.labels), float(sample.value)))
    return dict(out)


def _one(samples: dict, name: str) -> float | None:
    found = samples.get(name)
    return sum(v for _, v in found) if found else None


def _histogram(samples: dict, name: str) -> Histogram | None:
    buckets = samples.get(f"{name}_bucket")
    if not buckets:
        return None
    merged: dict[float, float] = defaultdict(float)  # summed over any labels besides `le`
    for labels, value in buckets:
        merged[float(labels["le"])] += value
    return Histogram(tuple(sorted(merged.items())), _one(samples, f"{name}_count") or 0.0,
                     _one(samples, f"{name}_sum") or 0.0)


def parse_snapshot(text: str, at: float) -> Snapshot:
    """`tetriinfer serve`'s /metrics text as a Snapshot; absent metrics keep their defaults (None, 0)."""
    s = samples_by_name(text)
    snap = Snapshot(at=at, requests_running=_one(s, PREFIX + "requests_running"))
    for labels, value in s.get(PREFIX + "requests_total", []):
        snap.requests[labels.get("outcome", "")] = value
    snap.output_tokens = _one(s, PREFIX + "output_tokens_sum") or 0.0
    for name in LATENCIES:
        hist = _histogram(s, f"{PREFIX}{name}_seconds")
        if hist is not None:
            snap.latencies[name] = hist
    snap.flips = _one(s, PREFIX + "flips_total")
    if PREFIX + "restarts_total" in s:
        snap.restarts = {labels.get("what", ""): v for labels, v in s[PREFIX + "restarts_total"]}
    created = [v for _, v in s.get(PREFIX + "requests_created", [])]
    snap.start_time = _one(s, "process_start_time_seconds") or (min(created) if created else None)
    snap.dead_instances = _one(s, PREFIX + "dead_instances")
    rows: dict[str, InstanceRow] = {}

    def row(labels: dict) -> InstanceRow:
        key = labels["instance"]
        if key not in rows:
            rows[key] = InstanceRow(key, labels.get("role", "?"))
        return rows[key]

    for labels, _ in s.get(PREFIX + "instance_info", []):
        row(labels).pid = int(labels["pid"]) if labels.get("pid", "").isdigit() else None
    for attr, name in _INSTANCE_SAMPLES.items():
        for labels, value in s.get(PREFIX + name, []):
            if "instance" in labels:
                setattr(row(labels), attr, value)
    for labels, value in s.get(PREFIX + "draining", []):
        if "instance" in labels:
            row(labels).draining = value > 0
    snap.instances = sorted(rows.values(), key=lambda r: (len(r.instance), r.instance))  # numeric ids in order
    return snap


def _rate(before: float | None, after: float | None, seconds: float) -> float | None:
    if before is None or after is None or after < before or seconds <= 0:
        return None
    return (after - before) / seconds


def rates(prev: Snapshot, cur: Snapshot) -> Rates:
    seconds = cur.at - prev.at
    before = {r.instance: r for r in prev.instances}
    transfers, moved = {}, {}
    for r in cur.instances:
        old = before.get(r.instance)
        transfers[r.instance] = _rate(old and old.kv_transfers, r.kv_transfers, seconds)
        moved[r.instance] = _rate(old and old.kv_transfer_bytes, r.kv_transfer_bytes, seconds)
    return Rates(seconds, _rate(prev.requests_done, cur.requests_done, seconds),
                 _rate(prev.output_tokens, cur.output_tokens, seconds), transfers, moved)


def histogram_quantile(q: float, hist: Histogram | None) -> float | None:
    """The q-quantile (0..1) of `hist`, as PromQL's histogram_quantile(): find the bucket holding rank
    q * count and interpolate linearly inside it (the first bucket from 0). A rank in the +Inf bucket
    answers the largest finite bound. None without observations."""
    if hist is None or not hist.buckets or hist.buckets[-1][1] <= 0:
        return None
    total = hist.buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for upper, count in hist.buckets:
        if count >= rank and count > lower_count:
            if math.isinf(upper):
                return lower_bound
            return lower_bound + (upper - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = upper, count
    return lower_bound
