"""Prometheus metrics of the API process: request outcomes and latencies measured here, plus the
cluster's view (backend.cluster_stats()) turned into gauges and counters at scrape time.

Each app owns its CollectorRegistry (not prometheus_client's global one), so several apps can live
in one process (tests) without name clashes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from tetriinfer.cluster.messages import ClusterStats

logger = logging.getLogger(__name__)

OUTCOMES = ("ok", "error", "aborted", "rejected")  # rejected = answered 4xx; aborted = the client left

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(18))  # 1 .. 131072


@dataclass
class RequestTiming:
    """One request's clock in the API process (time.monotonic seconds): TTFT is arrival to the first
    delta carrying tokens, TPOT the mean gap per token after the first, JCT arrival to the last delta."""

    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_delta: float | None = None
    num_output_tokens: int = 0

    def on_delta(self, num_tokens: int) -> None:
        now = time.monotonic()
        if num_tokens and self.first_token is None:
            self.first_token = now
        self.num_output_tokens += num_tokens
        self.last_delta = now

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.last_delta is None or self.num_output_tokens < 2:
            return None
        return (self.last_delta - self.first_token) / (self.num_output_tokens - 1)

    @property
    def jct(self) -> float | None:
        return None if self.last_delta is None else self.last_delta - self.arrival


class ServerMetrics:
    def __init__(self, cluster_stats: Callable[[], ClusterStats | None], requests_running: Callable[[], int],
                 model_name: str = "tetriinfer"):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        from tetriinfer.server.vllm_metrics import VllmClusterCollector, VllmRequestMetrics

        self.registry = CollectorRegistry()
        self.requests = Counter("tetriinfer_requests", "Generation requests by outcome (rejected = 4xx)",
                                ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:  # every outcome shows up from the first scrape, at 0
            self.requests.labels(outcome)
        self.ttft = Histogram("tetriinfer_ttft_seconds", "Arrival at the server to the first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("tetriinfer_tpot_seconds", "Mean gap between output tokens after the first",
                              buckets=_TPOT_BUCKETS, registry=self.registry)
        self.jct = Histogram("tetriinfer_jct_seconds", "Arrival at the server to the last token",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Histogram("tetriinfer_prompt_tokens", "Prompt length of served requests",
                                       buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.output_tokens = Histogram("tetriinfer_output_tokens", "Output length of served requests",
                                       buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.registry.register(ClusterCollector(cluster_stats, requests_running))
        from tetriinfer.predictor.prom import PredictorCollector

        self.registry.register(PredictorCollector(cluster_stats))  # predicted buckets, online accuracy
        # vLLM's names too (`vllm:...`), so a vLLM Grafana dashboard reads this endpoint unchanged
        self.vllm = VllmRequestMetrics(self.registry, model_name, _LATENCY_BUCKETS, _TPOT_BUCKETS, _TOKEN_BUCKETS)
        self.registry.register(VllmClusterCollector(cluster_stats, model_name))

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def finished_ok(self, timing: RequestTiming, prompt_tokens: int) -> None:
        """Latencies are recorded for requests served in full only, so aborts do not skew them."""
        self.count("ok")
        for histogram, value in ((self.ttft, timing.ttft), (self.tpot, timing.tpot), (self.jct, timing.jct)):
            if value is not None:
                histogram.observe(value)
        self.prompt_tokens.observe(prompt_tokens)
        self.output_tokens.observe(timing.num_output_tokens)
        self.vllm.finished_ok(timing.ttft, timing.tpot, timing.jct, prompt_tokens, timing.num_output_tokens)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ClusterCollector:
    """Reads the backend's latest ClusterStats at each scrape; nothing is cached here."""

    _INSTANCE_GAUGES = (
        ("kv_blocks_used", "KV cache blocks in use"),
        ("kv_blocks_free", "KV cache blocks free"),
        ("kv_blocks_total", "KV cache blocks in all"),
        ("kv_blocks_cached", "KV cache blocks held by no request, kept for prefix-cache hits (evictable)"),
        ("queued_prompt_tokens", "Prompt tokens queued, not yet prefilled (the global scheduler's load)"),
        ("num_waiting", "Requests queued for prefill (prefill, colocated) or for admission (decode)"),
        ("num_running", "Requests running"),
        ("num_dispatch_waiting", "Prefilled requests waiting for a decode instance with room"),
        ("load_fraction", "The instance's load as the flip policy sees it"),
        ("draining", "1 while the instance drains before a role flip"),
    )
    _INSTANCE_COUNTERS = (
        ("kv_transfer_bytes", "KV bytes moved"),
        ("kv_transfer_seconds", "Seconds spent moving KV"),
        ("kv_transfers", "KV transfers done"),
        ("kv_transfer_failures", "KV transfers failed"),
        ("kv_transfer_skipped_tokens", "KV tokens not moved: the decode instance held them in its prefix cache"),
        ("num_local_prefills", "Requests a decode instance prefilled itself (adaptive disaggregation)"),
        ("num_kept_decodes", "Requests a prefill instance decoded itself (adaptive disaggregation)"),
        ("kv_redispatches", "Offers a prefill instance took back from a decode instance that died or went silent"),
        ("kv_pushes_refused", "KVPush messages refused: not a transfer the decode instance issued to that sender"),
        ("send_failures", "Messages not sent: the destination's queue stayed full (each failed its request)"),
        ("prefix_queried_tokens", "Prompt tokens of the requests prefilled (hit rate: hit / queried)"),
        ("prefix_hit_tokens", "Prompt tokens served from the prefix cache"),
    )

    def __init__(self, cluster_stats: Callable[[], ClusterStats | None], requests_running: Callable[[], int]):
        self._cluster_stats = cluster_stats
        self._requests_running = requests_running

    def describe(self) -> Iterable:
        return []  # names depend on the cluster's state; nothing to check at registration

    def collect(self) -> Iterable:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("tetriinfer_requests_running", "Requests in flight in the API process",
                                value=self._requests_running())
        try:
            stats = self._cluster_stats()
        except Exception:  # a scrape must not fail because the backend's view is broken
            logger.exception("cluster_stats() failed; cluster metrics left out of this scrape")
            return
        if stats is None:
            return
        labels = ["instance", "role"]
        gauges = {name: GaugeMetricFamily(f"tetriinfer_{name}", doc, labels=labels)
                  for name, doc in self._INSTANCE_GAUGES}
        counters = {name: CounterMetricFamily(f"tetriinfer_{name}", doc, labels=labels)
                    for name, doc in self._INSTANCE_COUNTERS}
        for inst in stats.instances:
            values = [str(inst.instance_id), inst.role]
            for name, _ in self._INSTANCE_GAUGES:
                gauges[name].add_metric(values, float(_instance_value(inst, name)))
            for name, _ in self._INSTANCE_COUNTERS:
                counters[name].add_metric(values, float(getattr(inst, name)))
        # No socket address here: /metrics is unauthenticated, and the inboxes are the cluster's own.
        info = GaugeMetricFamily("tetriinfer_instance_info", "1 per live instance; its pid as a label",
                                 labels=["instance", "role", "pid"])
        for inst in stats.instances:
            info.add_metric([str(inst.instance_id), inst.role, str(inst.pid)], 1.0)
        yield info
        yield from gauges.values()
        yield from counters.values()
        yield GaugeMetricFamily("tetriinfer_instances", "Live instances reporting stats", value=len(stats.instances))
        yield CounterMetricFamily("tetriinfer_flips", "Role flips done", value=stats.num_flips)
        if stats.last_flip_s is not None:
            yield GaugeMetricFamily("tetriinfer_last_flip_seconds", "Seconds the last role flip took (drain + switch)",
                                    value=stats.last_flip_s)
        yield GaugeMetricFamily("tetriinfer_dead_instances", "Instances found dead",
                                value=len(stats.dead_instances))


def _instance_value(inst, name: str) -> float:
    if name == "kv_blocks_free":
        return inst.kv_blocks_total - inst.kv_blocks_used
    return getattr(inst, name)
