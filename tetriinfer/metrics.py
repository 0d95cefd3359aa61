"""Latency, cost and SLO metrics over finished requests: one code path for the simulator and the
real server (`bench`), so both report the same numbers. All times are seconds on one clock;
definitions in docs/DESIGN.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np


@dataclass
class RequestRecord:
    request_id: int
    arrival_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    output_tokens: int

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def jct_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean gap between the tokens after the first; None for a one-token output."""
        if self.output_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class LatencyStats:
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "LatencyStats":
        if len(values) == 0:
            return cls(math.nan, math.nan, math.nan, math.nan)
        array = np.asarray(values, dtype=float)
        p50, p90, p99 = np.percentile(array, [50, 90, 99])
        return cls(float(array.mean()), float(p50), float(p90), float(p99))


@dataclass(frozen=True)
class Summary:
    num_requests: int
    start_s: float  # the workload's start: the first arrival unless given
    makespan_s: float  # start to the last request's finish
    ttft: LatencyStats
    tpot: LatencyStats  # over requests with at least two output tokens
    jct: LatencyStats
    throughput_rps: float  # requests / makespan
    output_tokens_per_s: float
    resource_time_s: float  # sum over instances of start -> that instance's last work
    requests_per_resource_s: float  # perf/$ before normalising by a baseline
    ttft_slo_s: float | None
    tpot_slo_s: float | None
    slo_attainment: float | None  # fraction of requests meeting both SLOs; None without SLOs
    goodput_rps: float | None  # requests meeting both SLOs / makespan


def summarize(
    records: Iterable[RequestRecord],
    instance_last_work_s: Mapping[Hashable, float],
    *,
    ttft_slo_s: float | None = None,
    tpot_slo_s: float | None = None,
    start_s: float | None = None,
) -> Summary:
    """Metrics of one run. `instance_last_work_s` maps each instance (any id) to the time of its last work
    (an instance that never worked counts from the start to the start: 0 s). A missing SLO is met
    by every request; with neither SLO, goodput is None."""
    records = list(records)
    if not records:
        raise ValueError("summarize needs at least one finished request")
    start = min(r.arrival_s for r in records) if start_s is None else start_s
    makespan = max(r.finish_s for r in records) - start
    resource_time = sum(max(last - start, 0.0) for last in instance_last_work_s.values())
    tpots = [t for t in (r.tpot_s for r in records) if t is not None]
    if ttft_slo_s is None and tpot_slo_s is None:
        attainment = goodput = None
    else:
        good = sum(1 for r in records if _meets(r, ttft_slo_s, tpot_slo_s))
        attainment = good / len(records)
        goodput = good / makespan if makespan > 0 else math.nan
    return Summary(
        num_requests=len(records),
        start_s=start,
        makespan_s=makespan,
        ttft=LatencyStats.of([r.ttft_s for r in records]),
        tpot=LatencyStats.of(tpots),
        jct=LatencyStats.of([r.jct_s for r in records]),
        throughput_rps=len(records) / makespan if makespan > 0 else math.nan,
        output_tokens_per_s=sum(r.output_tokens for r in records) / makespan if makespan > 0 else math.nan,
        resource_time_s=resource_time,
        requests_per_resource_s=len(records) / resource_time if resource_time > 0 else math.nan,
        ttft_slo_s=ttft_slo_s,
        tpot_slo_s=tpot_slo_s,
        slo_attainment=attainment,
        goodput_rps=goodput,
    )


def _meets(record: RequestRecord, ttft_slo_s: float | None, tpot_slo_s: float | None) -> bool:
    if ttft_slo_s is not None and record.ttft_s > ttft_slo_s:
        return False
    tpot = record.tpot_s
    return tpot_slo_s is None or tpot is None or tpot <= tpot_slo_s


def perf_per_dollar(summary: Summary, baseline: Summary) -> float:
    """Requests per second of resource time, as a ratio to the baseline's (DESIGN.md's perf/$)."""
    return summary.requests_per_resource_s / baseline.requests_per_resource_s
