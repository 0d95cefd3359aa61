"""Start `tetriinfer serve` in a subprocess for end-to-end tests, and wait on what /metrics shows."""

from __future__ import annotations

import time
from typing import Callable

from tetriinfer.bench.server_process import ServerProcess


def wait_until(predicate: Callable, timeout_s: float = 30.0, what: str = "condition", *,
               interval_s: float = 0.1, details: Callable[[], str] | None = None):
    """Poll `predicate` until it returns something truthy, and return that; after `timeout_s`, fail
    the test naming `what` (followed by `details()`, e.g. a log tail)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}"
                                 + (f"\n{details()}" if details else ""))
        time.sleep(interval_s)


class Server(ServerProcess):
    """`with start_server(...) as server:` stops the server when the block ends."""

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_until(self, predicate, timeout_s: float = 30.0, what: str = "condition"):
        return wait_until(predicate, timeout_s, what,
                          details=lambda: f"--- server log ---\n{self.log()[-4000:]}")

    def wait_for_instances(self, n: int, timeout_s: float = 20.0) -> dict[int, tuple[str, int]]:
        """instance_pids() once /metrics shows exactly `n` instances."""
        def pids():
            got = self.instance_pids()
            return got if len(got) == n else None
        return self.wait_until(pids, timeout_s, f"{n} instances in /metrics")


def start_server(args: list[str], tmp_path, timeout_s: float = 180.0) -> Server:
    log_path = tmp_path / f"serve-{time.monotonic_ns()}.log"
    return Server.start(args, log_path, env={"OMP_NUM_THREADS": "1", "TETRIINFER_LOG": "WARNING"},
                        timeout_s=timeout_s)
