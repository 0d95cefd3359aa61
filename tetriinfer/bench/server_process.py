"""`tetriinfer serve` in a child process, for load tests and benchmarks: start it, wait until it is
healthy, read its Prometheus metrics, stop it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tetriinfer.net import free_port

# kv_counters() key -> what follows `tetriinfer_kv_transfer` in the counter's name
KV_TRANSFER_COUNTERS = {"bytes": "_bytes", "seconds": "_seconds", "count": "s", "failures": "_failures"}


def _escape(label_value: str) -> str:
    return label_value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition as {'name{labels}': value}, the key spelled as in
    the text (labels in their order there, values escaped)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sample.labels.items())
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log_path: Path

    @classmethod
    def start(cls, flags: list[str], log_path: str | Path, *, env: dict | None = None,
              timeout_s: float = 180.0) -> "ServerProcess":
        """Run `tetriinfer serve FLAGS --port <free port>`, its output to `log_path`; return once
        /health answers 200. Raises RuntimeError (with the log's tail) if it exits or stays unhealthy."""
        port = free_port()
        log_path = Path(log_path)
        with open(log_path, "w") as log:
            process = subprocess.Popen([sys.executable, "-m", "tetriinfer.cli", "serve", "--port", str(port), *flags],
                                       stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        server = cls(process, f"http://127.0.0.1:{port}", log_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"tetriinfer serve exited with {process.returncode}:\n{server.log()[-4000:]}")
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        server.stop()
        raise RuntimeError(f"tetriinfer serve was not healthy after {timeout_s:.0f} s:\n{server.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text()

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{labels}': value}."""
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10).text)

    def metric_sum(self, name: str, samples: dict[str, float] | None = None, **labels) -> float:
        """The sum of `name`'s samples whose labels include `labels`, from `samples` (what `metrics()`
        returned) or, without them, from a fresh GET /metrics."""
        total = 0.0
        for key, value in (self.metrics() if samples is None else samples).items():
            if (key == name or key.startswith(name + "{")) and all(f'{k}="{v}"' in key for k, v in labels.items()):
                total += value
        return total

    def instance_pids(self) -> dict[int, tuple[str, int]]:
        """instance id -> (role, pid), from the tetriinfer_instance_info gauge."""
        out = {}
        for key in self.metrics():
            if key.startswith("tetriinfer_instance_info{"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', key))
                out[int(labels["instance"])] = (labels["role"], int(labels["pid"]))
        return out

    def cluster_pids(self) -> set[int]:
        """The controller's and instances' pids: the server's multiprocessing children (Linux /proc),
        not its resource tracker."""
        pids = set()
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == self.process.pid and "spawn_main" in Path(f"/proc/{entry}/cmdline").read_text():
                    pids.add(int(entry))
            except (OSError, IndexError, ValueError):
                pass  # gone meanwhile
        return pids

    def kv_counters(self) -> dict[str, float]:
        """KV transfer totals so far (both ends of a transfer count it: halved) and instance flips,
        from one GET /metrics: {'bytes', 'seconds', 'count', 'failures', 'flips'}; and the prefix
        cache's prompt tokens looked up and found ('prefix_queried', 'prefix_hit')."""
        samples = self.metrics()
        totals = {key: self.metric_sum(f"tetriinfer_kv_transfer{suffix}_total", samples) / 2
                  for key, suffix in KV_TRANSFER_COUNTERS.items()}
        totals["flips"] = self.metric_sum("tetriinfer_flips_total", samples)
        totals["prefix_queried"] = self.metric_sum("tetriinfer_prefix_queried_tokens_total", samples)
        totals["prefix_hit"] = self.metric_sum("tetriinfer_prefix_hit_tokens_total", samples)
        return totals

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGINT (uvicorn shuts down, the cluster gets Shutdown), then kill if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def process_running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
