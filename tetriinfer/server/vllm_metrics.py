"""vLLM's metric names beside ours, so an existing vLLM Grafana dashboard works on /metrics as it is.

Every series carries vLLM's `model_name` label (the served model name). Request histograms are
observed once per finished request, next to `ServerMetrics`' own; the cluster's gauges and counters
are sums over the live instances, read from the same `ClusterStats` at each scrape:

| vLLM name | from |
|---|---|
| `vllm:num_requests_running`, `vllm:num_requests_waiting` | instances' running; queued + waiting for a decode instance |
| `vllm:kv_cache_usage_perc` | KV blocks used / total, all instances (0..1) |
| `vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total` | prompt tokens looked up / served from the prefix cache |
| `vllm:time_to_first_token_seconds`, `vllm:e2e_request_latency_seconds` | the API process's TTFT and JCT |
| `vllm:time_per_output_token_seconds` | each request's mean gap between output tokens (vLLM observes every gap) |
| `vllm:request_prompt_tokens`, `vllm:request_generation_tokens` | per finished request |
| `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`, `vllm:request_success_total` | counts of finished requests (no `finished_reason` label) |
"""

from __future__ import annotations

from typing import Callable, Iterable

from tetriinfer.cluster.messages import ClusterStats


def requests_running_and_waiting(stats: ClusterStats | None) -> tuple[int, int]:
    """Requests running on the instances, and those waiting (queued for a prefill, or prefilled and
    waiting for a decode instance), over all instances of the latest ClusterStats."""
    instances = stats.instances if stats is not None else []
    return (sum(i.num_running for i in instances),
            sum(i.num_waiting + i.num_dispatch_waiting for i in instances))


class VllmRequestMetrics:
    def __init__(self, registry, model_name: str, latency_buckets, tpot_buckets, token_buckets) -> None:
        from prometheus_client import Counter, Histogram

        def histogram(name, doc, buckets):
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=registry).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, ["model_name"], registry=registry).labels(model_name)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token (TetriInfer)", latency_buckets)
        self.tpot = histogram("vllm:time_per_output_token_seconds", "Mean time per output token of a request",
                              tpot_buckets)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", latency_buckets)
        self.prompt = histogram("vllm:request_prompt_tokens", "Prompt tokens per finished request", token_buckets)
        self.generation = histogram("vllm:request_generation_tokens", "Generated tokens per finished request",
                                    token_buckets)
        self.prompt_total = counter("vllm:prompt_tokens", "Prompt tokens of finished requests")
        self.generation_total = counter("vllm:generation_tokens", "Generated tokens of finished requests")
        self.success = counter("vllm:request_success", "Requests finished successfully")

    def finished_ok(self, ttft: float | None, tpot: float | None, jct: float | None, prompt_tokens: int,
                    output_tokens: int) -> None:
        for histogram, value in ((self.ttft, ttft), (self.tpot, tpot), (self.e2e, jct)):
            if value is not None:
                histogram.observe(value)
        self.prompt.observe(prompt_tokens)
        self.generation.observe(output_tokens)
        self.prompt_total.inc(prompt_tokens)
        self.generation_total.inc(output_tokens)
        self.success.inc()


class VllmClusterCollector:
    """vLLM's scheduler and cache gauges, summed over the instances of the latest ClusterStats."""

    def __init__(self, cluster_stats: Callable[[], ClusterStats | None], model_name: str) -> None:
        self._cluster_stats = cluster_stats
        self._model_name = model_name

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            stats = self._cluster_stats()
        except Exception:  # ServerMetrics' own collector logs it; a scrape must not fail
            return
        if stats is None:
            return
        insts = stats.instances
        labels, value = ["model_name"], [self._model_name]
        total_blocks = sum(i.kv_blocks_total for i in insts)
        running, waiting = requests_running_and_waiting(stats)
        for name, doc, number, family in (
            ("vllm:num_requests_running", "Requests running on the instances", running, GaugeMetricFamily),
            ("vllm:num_requests_waiting", "Requests waiting for a prefill or for a decode instance", waiting,
             GaugeMetricFamily),
            ("vllm:kv_cache_usage_perc", "KV cache blocks in use over all blocks (1 = full)",
             sum(i.kv_blocks_used for i in insts) / total_blocks if total_blocks else 0.0, GaugeMetricFamily),
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
             sum(i.prefix_queried_tokens for i in insts), CounterMetricFamily),
            ("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache",
             sum(i.prefix_hit_tokens for i in insts), CounterMetricFamily),
        ):
            metric = family(name, doc, labels=labels)
            metric.add_metric(value, float(number))
            yield metric
