"""CUDA MPS for instances sharing a GPU (cluster.mps), against a stand-in control program that
behaves as nvidia-cuda-mps-control does for start and quit (the real one needs a GPU driver)."""

from __future__ import annotations

import os
import stat

import pytest

from tetriinfer.cluster.mps import MpsDaemon, MpsError, parse_sm_shares, role_share
from tetriinfer.config import ServeConfig

FAKE_CONTROL = """#!/bin/sh
# -d: start the daemon (it opens its control pipe); no argument: read a command ("quit") on stdin.
if [ "$1" = "-d" ]; then touch "$CUDA_MPS_PIPE_DIRECTORY/control"; echo start >> "$FAKE_MPS_CALLS";
else cat >> "$FAKE_MPS_CALLS"; fi
"""


@pytest.fixture
def fake_control(tmp_path, monkeypatch):
    path = tmp_path / "nvidia-cuda-mps-control"
    path.write_text(FAKE_CONTROL)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_CALLS", str(tmp_path / "calls"))
    return tmp_path / "calls"


def test_the_daemon_lives_in_a_private_folder_and_instances_get_their_role_share(fake_control):
    daemon = MpsDaemon.start()
    assert stat.S_IMODE(os.stat(daemon.root).st_mode) == 0o700
    env = daemon.instance_env("prefill", (60, 40))
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "60"
    assert daemon.instance_env("decode", (60, 40))["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "40"
    assert env["CUDA_MPS_PIPE_DIRECTORY"].startswith(daemon.root)
    daemon.stop()
    assert fake_control.read_text().split() == ["start", "quit"]
    assert not os.path.exists(daemon.root)


def test_without_the_mps_tools_the_error_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MpsError, match="nvidia-cuda-mps-control is not on PATH"):
        MpsDaemon.start()


def test_shares_are_two_percentages_for_the_disaggregated_roles():
    assert parse_sm_shares("60,40") == (60, 40)
    for bad in ("60", "0,50", "60,101", "a,b"):
        with pytest.raises(ValueError):
            parse_sm_shares(bad)
    with pytest.raises(ValueError):
        role_share("colocated", (60, 40))
    with pytest.raises(ValueError, match="disagg"):
        ServeConfig(mode="colocated", mps_sm_shares=(60, 40))
