"""CUDA MPS for instances that share one GPU: each process gets a share of the SMs by its role.

Time-slicing two processes on one GPU makes a decode step wait behind whole prefill kernels (we
measured decode steps 2.4x slower on an H200 beside 2,048-token chunks). Under MPS the processes'
kernels run side by side, and `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` caps the SMs each may use, so a
prefill instance cannot crowd out a decode instance's steps.

`tetriinfer serve --mps-sm-shares P,D` starts a private MPS control daemon for the cluster (its
pipe and log folders in a fresh 0700 temporary folder, so it neither finds nor disturbs another
daemon), gives prefill instances P% and decode instances D% of the SMs, and quits the daemon when
the cluster stops. A process's share is fixed when its CUDA context is made, so an instance keeps
its share across a role flip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

from tetriinfer.sched.monitor import DECODE, PREFILL

CONTROL = "nvidia-cuda-mps-control"


class MpsError(ValueError):
    """MPS was asked for where it cannot run (the CLI reports it as bad input)."""


def parse_sm_shares(text: str) -> tuple[int, int]:
    """`"60,40"` -> (60, 40): percent of the SMs for prefill and for decode instances."""
    try:
        prefill, decode = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"SM shares are two percentages 'PREFILL,DECODE' such as 60,40; got {text!r}") from None
    if not (1 <= prefill <= 100 and 1 <= decode <= 100):
        raise ValueError(f"SM shares must be percentages in 1..100, got {prefill},{decode}")
    return prefill, decode


def role_share(role: str, shares: tuple[int, int]) -> int:
    if role == PREFILL:
        return shares[0]
    if role == DECODE:
        return shares[1]
    raise ValueError(f"MPS SM shares apply to prefill and decode instances, not {role!r}")


@dataclass
class MpsDaemon:
    """A running MPS control daemon owned by one cluster."""

    root: str

    @property
    def env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(self.root, "pipe"),
                "CUDA_MPS_LOG_DIRECTORY": os.path.join(self.root, "log")}

    def instance_env(self, role: str, shares: tuple[int, int]) -> dict[str, str]:
        return {**self.env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(role_share(role, shares))}

    @classmethod
    def start(cls, timeout_s: float = 10.0) -> "MpsDaemon":
        if shutil.which(CONTROL) is None:
            raise MpsError(f"{CONTROL} is not on PATH: MPS needs the NVIDIA driver's MPS tools")
        daemon = cls(tempfile.mkdtemp(prefix="tetriinfer-mps-"))  # 0700
        for sub in ("pipe", "log"):
            os.makedirs(os.path.join(daemon.root, sub))
        env = {**os.environ, **daemon.env}
        try:
            subprocess.run([CONTROL, "-d"], env=env, check=True, timeout=timeout_s, capture_output=True)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            shutil.rmtree(daemon.root, ignore_errors=True)
            raise MpsError(f"could not start the MPS control daemon: {e}") from None
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(os.path.join(daemon.root, "pipe", "control")):
            if time.monotonic() > deadline:
                daemon.stop()
                raise MpsError(f"the MPS control daemon did not open its pipe within {timeout_s} s")
            time.sleep(0.05)
        return daemon

    def stop(self, timeout_s: float = 10.0) -> None:
        """Quit the daemon (it stops its server once the clients are gone) and remove its folders."""
        try:
            subprocess.run([CONTROL], input=b"quit\n", env={**os.environ, **self.env}, timeout=timeout_s,
                           capture_output=True)
        except (OSError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)
