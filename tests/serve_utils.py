"""Start `tetriinfer serve` in a subprocess for end-to-end tests, and wait on what /metrics shows."""

from __future__ import annotations

import re
import time

from tetriinfer.bench.server_process import ServerProcess


class Server(ServerProcess):
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


def start_server(args: list[str], tmp_path, timeout_s: float = 180.0) -> Server:
    log_path = tmp_path / f"serve-{time.monotonic_ns()}.log"
    return Server.start(args, log_path, env={"OMP_NUM_THREADS": "1", "TETRIINFER_LOG": "WARNING"},
                        timeout_s=timeout_s)
