"""What one simulated run returns: every request with its timestamps, and the run's counters."""

from __future__ import annotations

from dataclasses import dataclass, field

from tetriinfer.metrics import RequestRecord, Summary, summarize
from tetriinfer.sim.request import SimRequest


@dataclass
class SimResult:
    system: str
    requests: list[SimRequest]  # every request, finished, with its timestamps
    instance_last_work_s: dict[int, float]  # per instance: end of its last forward pass
    start_s: float
    end_s: float
    num_preemptions: int = 0
    num_flips: int = 0
    num_events: int = 0
    peak_dispatch_waiting: int = 0  # most prefilled requests a snapshot saw waiting for decode room
    flips: list[tuple[float, int, str]] = field(default_factory=list)  # (time, instance, new role)
    prefix_queried_tokens: int = 0  # prompt tokens looked up in a prefix cache (0: caching off)
    prefix_hit_tokens: int = 0  # of them, served from the cache (not prefilled)
    prefix_evicted_blocks: int = 0
    kv_skipped_tokens: int = 0  # KV tokens transfers did not move: the decode instance's cache held them

    @property
    def prefix_hit_rate(self) -> float:
        """Cached / looked-up prompt tokens (the engine's `prefix_hit_tokens / prefix_queried_tokens`)."""
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    def records(self) -> list[RequestRecord]:
        return [
            RequestRecord(r.request_id, r.arrival_s, r.first_token_s, r.finish_s, r.prompt_tokens, r.output_tokens)
            for r in self.requests
        ]

    def summary(self, ttft_slo_s: float | None = None, tpot_slo_s: float | None = None) -> Summary:
        return summarize(
            self.records(),
            self.instance_last_work_s,
            ttft_slo_s=ttft_slo_s,
            tpot_slo_s=tpot_slo_s,
            start_s=self.start_s,
        )

    def prefill_wait_s(self) -> list[float]:
        """Per request: arrival to the start of its first prefill chunk (queueing before prefill)."""
        return [r.prefill_start_s - r.arrival_s for r in self.requests]
