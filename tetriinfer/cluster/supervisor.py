"""Keeping the cluster up: the supervisor in the API process, and the child side of parent death.

The API process owns the cluster: it started the controller and every instance, so it watches them
and brings back the ones that die or freeze. The controller comes back on the same port, so the
instances' PUSH sockets reconnect by themselves; it rebuilds its view from their next reports.
An instance comes back with the same id, role (the one it was started with), device and engine.

    supervisor (API process, every poll_s)           controller / instances
    controller process exited,
      or no ClusterStats for silent_after_s  ──────> kill it; client.controller_lost():
                                                     queued Submits dropped, unrouted requests 503,
                                                     new requests 503, routed ones stream on
    after the backoff: start it again, same port ──> new controller (recovering): an instance's
                                                     stats -> Register -> Ready again
                                                     all back (or dead_after_s) -> ClusterReady
    client: controller_up, /health 200 again   <──── aborts held while it was down are sent
    instance process exited                    ───── (the controller saw it too: InstanceDied,
      or the controller declared it dead               its requests failed, no more routing)
      (a frozen one is killed: SIGKILL)
    after the backoff: same InstanceConfig     ────> new process: Ready -> the controller clears
                                                     `dead`, the address book has it again
    restarts_total{what} += 1                        (gloo / nccl: a process group cannot take a
                                                     new member, so those instances stay dead)

Backoff: the first restart of a component is immediate; each further one within `stable_after_s`
of the last waits twice as long (from `backoff_first_s`, at most `backoff_max_s`). A restarted
process that never reports within its startup timeout is killed and started again.

Children die with their parent: `supervised_main` (the entry point the local launcher gives every
child) asks Linux for SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG), polls its parent pid
as the portable fallback (and exits hard if SIGTERM did not end it), turns SIGTERM into SystemExit
so the process's `finally` blocks run (its KV shared memory is unlinked), and ignores SIGINT (a
Ctrl-C reaches the whole process group; the API process drains first, then stops the children).
Its cleanup done, a child leaves through `exit_now`: atexit handlers, then no interpreter teardown
(torch's takes seconds), so a stopping cluster is gone in about a second.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

log = logging.getLogger("tetriinfer.supervisor")

RESTART_KINDS = ("controller", "instance")


class SupervisedCluster(Protocol):
    """What the supervisor needs of a launcher's cluster (cluster.launcher.LocalCluster, RayCluster)."""

    restartable: bool  # instances can be replaced (not under the gloo / nccl KV transports)

    def controller_alive(self) -> bool: ...
    def alive(self) -> list[int]: ...
    def instance_pid(self, i: int) -> int | None: ...
    def kill_controller(self) -> None: ...
    def start_controller(self) -> None: ...
    def kill_instance(self, i: int) -> None: ...
    def start_instance(self, i: int) -> None: ...


@dataclass(frozen=True)
class SupervisorConfig:
    poll_s: float = 0.2
    silent_after_s: float = 5.0  # the controller sent no ClusterStats for this long: frozen
    controller_startup_s: float = 35.0  # a restarted controller must be ready within this
    instance_startup_s: float = 600.0  # a restarted instance must report within this
    backoff_first_s: float = 0.5
    backoff_max_s: float = 30.0
    stable_after_s: float = 60.0  # up this long since its last restart: the backoff starts over


@dataclass
class _Component:
    """One supervised process's restart state."""

    failures: int = 0  # restarts within stable_after_s of the previous one
    started_at: float = float("-inf")
    restart_at: float | None = None  # dead, to be started at this time
    starting: bool = False  # started, not yet seen serving

    def schedule(self, now: float, cfg: SupervisorConfig) -> float:
        if now - self.started_at > cfg.stable_after_s:
            self.failures = 0
        delay = 0.0 if self.failures == 0 else min(cfg.backoff_max_s, cfg.backoff_first_s * 2 ** (self.failures - 1))
        self.failures += 1
        self.restart_at = now + delay
        self.starting = False
        return delay

    def started(self, now: float) -> None:
        self.restart_at = None
        self.starting = True
        self.started_at = now


class Supervisor:
    """Watches the cluster from the API process; `check` decides, `run` calls it every poll_s.
    Runs on the event loop's (main) thread: PR_SET_PDEATHSIG fires when the *thread* that
    started a child ends, so children must be started from a thread that lives as long as the process."""

    def __init__(self, cluster: SupervisedCluster, client, num_instances: int,
                 config: SupervisorConfig = SupervisorConfig()) -> None:
        self.cluster = cluster
        self.client = client
        self.config = config
        self.restarts = dict.fromkeys(RESTART_KINDS, 0)
        self._controller = _Component()
        self._instances = [_Component() for _ in range(num_instances)]
        self._last_pid: dict[int, int] = {}  # the pid the controller last reported per instance
        self._given_up: set[int] = set()

    async def run(self) -> None:
        while True:
            try:
                self.check(time.monotonic())
            except Exception:  # noqa: BLE001 - the supervisor must outlive one bad check
                log.exception("supervisor check failed")
            await asyncio.sleep(self.config.poll_s)

    def check(self, now: float) -> None:
        self._check_controller(now)
        self._check_instances(now)

    # ---- the controller ----------------------------------------------------------------------------
    def _check_controller(self, now: float) -> None:
        c, cfg = self._controller, self.config
        if c.restart_at is not None:
            if now >= c.restart_at:
                self.cluster.start_controller()
                c.started(now)
                self.restarts["controller"] += 1
                log.warning("controller restarted (restart %d)", self.restarts["controller"])
            return
        if self.client.controller_up:
            c.starting = False
            reason = None
            if not self.cluster.controller_alive():
                reason = "its process exited"
            elif now - self.client.last_heard > cfg.silent_after_s:
                reason = f"it sent nothing for {now - self.client.last_heard:.1f} s"
            if reason is not None:
                self.client.controller_lost(reason)
                self._restart_controller(now, reason)
        elif c.starting and (not self.cluster.controller_alive() or now - c.started_at > cfg.controller_startup_s):
            self._restart_controller(now, "the restarted controller did not come up")

    def _restart_controller(self, now: float, reason: str) -> None:
        self.cluster.kill_controller()
        delay = self._controller.schedule(now, self.config)
        log.error("controller lost (%s); restarting it in %.1f s", reason, delay)

    # ---- instances ---------------------------------------------------------------------------------
    def _check_instances(self, now: float) -> None:
        reported = self.client.reported_pids()
        self._last_pid.update(reported)
        deaths, self.client.deaths = self.client.deaths, []
        for death in deaths:  # declared dead by the controller: kill it if it is that same process
            i = death.instance_id
            if 0 <= i < len(self._instances) and self._last_pid.get(i) == self.cluster.instance_pid(i):
                log.error("instance %d was declared dead (%s): killing process %s", i, death.reason,
                          self.cluster.instance_pid(i))
                self.cluster.kill_instance(i)
        alive = set(self.cluster.alive())
        for i, c in enumerate(self._instances):
            if c.restart_at is not None:
                if now >= c.restart_at:
                    self.cluster.start_instance(i)
                    c.started(now)
                    self.restarts["instance"] += 1
                    log.warning("instance %d restarted as process %s", i, self.cluster.instance_pid(i))
            elif i not in alive:
                self._restart_instance(i, now)
            elif c.starting:
                if reported.get(i) == self.cluster.instance_pid(i):
                    c.starting = False  # back in the controller's view
                elif now - c.started_at > self.config.instance_startup_s:
                    log.error("restarted instance %d did not report within %.0f s", i, self.config.instance_startup_s)
                    self.cluster.kill_instance(i)

    def _restart_instance(self, i: int, now: float) -> None:
        if not self.cluster.restartable:
            if i not in self._given_up:
                self._given_up.add(i)
                log.error("instance %d is gone and cannot be replaced under this KV transport", i)
            return
        delay = self._instances[i].schedule(now, self.config)
        log.error("instance %d is gone; restarting it in %.1f s", i, delay)

    def collector(self) -> "RestartCollector":
        return RestartCollector(lambda: self.restarts)


class RestartCollector:
    """tetriinfer_restarts_total{what="controller"|"instance"} for the app's Prometheus registry."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("tetriinfer_restarts", "Processes the supervisor restarted", labels=["what"])
        for what, n in self._counts().items():
            family.add_metric([what], float(n))
        yield family


# ---- the child side ------------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1
PARENT_POLL_S = 1.0
EXIT_GRACE_S = 10.0  # after SIGTERM for a lost parent, exit hard if still running


def supervised_main(entry: Callable, config, parent_pid: int) -> None:
    """A child's entry point: die with the parent, then run `entry(config)`; once it returns or
    SIGTERM ends it (its cleanup done either way), exit at once (`exit_now`)."""
    die_with_parent(parent_pid)
    # Started daemonic (the parent's exit ends it), but an engine with tensor_parallel_size > 1
    # starts its rank processes, which multiprocessing forbids a daemonic process; dying with the
    # parent is already assured by die_with_parent.
    mp.current_process().daemon = False
    try:
        entry(config)
    except SystemExit as e:  # SIGTERM (_exit_on_sigterm): entry's cleanup has run on the way out
        exit_now(e.code if isinstance(e.code, int) else 1)
    exit_now(0)


def exit_now(code: int) -> None:
    """Exit after the Python-level exit handlers (multiprocessing's, logging's, ...) but before
    the interpreter's teardown, whose torch part (C++ static destructors deregistering every
    operator) takes seconds on a busy CPU: that was most of a stopping server's time."""
    import atexit

    # Already leaving: a SIGTERM now (the launcher's, after its grace) must not raise SystemExit
    # inside an exit handler, such as the one stopping tensor-parallel ranks (each of its waits is
    # bounded, and the launcher's SIGKILL still ends us).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    try:
        atexit._run_exitfuncs()
    finally:
        os._exit(code)


def die_with_parent(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        except (OSError, AttributeError) as e:
            log.warning("no prctl (%s): parent pid polling only", e)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit(f"parent {parent_pid} is gone")
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()


def _exit_on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish; the watcher bounds it
    raise SystemExit(128 + signum)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(EXIT_GRACE_S)
    os._exit(1)
