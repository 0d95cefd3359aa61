"""What the server prints, as vLLM does: one access line per finished generation request, and a
periodic stats line (prompt and generation throughput over the interval, requests running and
waiting, KV cache usage). `--disable-log-requests` and `--disable-log-stats` turn them off.

Both go to the `tetriinfer.server` logger at INFO; the stats line is printed only when something
happened in its interval (or requests are still in flight), so an idle server stays quiet.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from tetriinfer.cluster.messages import ClusterStats

if TYPE_CHECKING:
    from tetriinfer.server.jobs import Job

logger = logging.getLogger("tetriinfer.server")

DEFAULT_STATS_INTERVAL_S = 10.0  # vLLM's


@dataclass
class LogConfig:
    log_requests: bool = True
    log_stats: bool = True
    stats_interval_s: float = DEFAULT_STATS_INTERVAL_S


def log_request(job: "Job", outcome: str, status: int, completion_tokens: int) -> None:
    t = job.timing
    ttft = "-" if t.ttft is None else f"{t.ttft:.3f}s"
    e2e = time.monotonic() - t.arrival
    logger.info("%s POST %s %d %s choices=%d prompt_tokens=%d completion_tokens=%d ttft=%s e2e=%.3fs",
                job.request_id, job.path, status, outcome, len(job.subs), job.prompt_tokens, completion_tokens,
                ttft, e2e)


@dataclass
class StatsLogger:
    """Token counters fed by the server; `tick()` prints and resets them once per interval."""

    cluster_stats: Callable[[], ClusterStats | None]
    requests_running: Callable[[], int]
    interval_s: float = DEFAULT_STATS_INTERVAL_S
    prompt_tokens: int = 0
    generation_tokens: int = 0
    _last: float = field(default_factory=time.monotonic)

    def on_finished(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += completion_tokens

    def line(self, now: float | None = None) -> str | None:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._last, 1e-9)
        running = self.requests_running()
        if not (self.prompt_tokens or self.generation_tokens or running):
            self._last = now
            return None
        stats = self.cluster_stats()
        waiting = kv = "-"
        if stats is not None and stats.instances:
            waiting = str(sum(i.num_waiting for i in stats.instances))
            total = sum(i.kv_blocks_total for i in stats.instances)
            kv = f"{100.0 * sum(i.kv_blocks_used for i in stats.instances) / max(total, 1):.1f}%"
        text = (f"Avg prompt throughput: {self.prompt_tokens / elapsed:.1f} tokens/s, "
                f"Avg generation throughput: {self.generation_tokens / elapsed:.1f} tokens/s, "
                f"Running: {running} reqs, Waiting: {waiting} reqs, KV cache usage: {kv}")
        self.prompt_tokens = self.generation_tokens = 0
        self._last = now
        return text

    async def run(self) -> None:
        """Print a line every interval until cancelled (the app's lifespan runs it)."""
        import anyio

        while True:
            await anyio.sleep(self.interval_s)
            try:
                text = self.line()
            except Exception:  # noqa: BLE001 - a stats line must never take the server down
                logger.exception("stats line failed")
                continue
            if text is not None:
                logger.info(text)
