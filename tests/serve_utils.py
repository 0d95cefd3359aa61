"""Start `tetriinfer serve` in a subprocess for end-to-end tests, and read its /metrics."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log_path: str

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{labels}': value}."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def metric_sum(self, name: str, **labels) -> float:
        total = 0.0
        for key, value in self.metrics().items():
            if key == name or key.startswith(name + "{"):
                if all(f'{k}="{v}"' in key for k, v in labels.items()):
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

    def wait_until(self, predicate, timeout_s: float = 30.0, what: str = "condition"):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n--- server log ---\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # uvicorn shuts down; the cluster gets Shutdown
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_server(args: list[str], tmp_path, timeout_s: float = 180.0) -> Server:
    port = free_port()
    log_path = str(tmp_path / f"serve-{port}.log")
    env = dict(os.environ, OMP_NUM_THREADS="1", TETRIINFER_LOG="WARNING")
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "tetriinfer.cli", "serve", "--port", str(port), *args],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"tetriinfer serve exited with {process.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise AssertionError(f"tetriinfer serve did not become healthy in {timeout_s} s:\n{server.log()[-4000:]}")
