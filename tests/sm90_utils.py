"""Building Triton kernels for sm_90 without a GPU: each test module's script compiles its kernels
with the ptxas inside the triton wheel (no TRITON_INTERPRET, which accepts code that does not lower)
and prints a CONFIG line per build; ptxas's log (registers, spills) goes to stdout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys


def run_sm90_builds(script: str, configs: list, tmp_path, **env_overrides: str) -> str:
    """Run `script` with `configs` (JSON, its argv[1]) in a fresh interpreter; its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v output (registers, spills) goes to stdout
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cache hit would skip ptxas and its log
    env.update(env_overrides)
    result = subprocess.run([sys.executable, "-c", script, json.dumps(configs)], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)  # registers per configuration, for `pytest -s -k sm90`
    return result.stdout


def spill_stores(stdout: str) -> list[int]:
    """Bytes of register spill stores, one entry per ptxas build in the log."""
    return [int(n) for n in re.findall(r"(\d+) bytes spill stores", stdout)]


def assert_builds_without_spills(script: str, configs: list, tmp_path, **env_overrides: str) -> str:
    """Every configuration of `script` builds for sm_90 (one CONFIG line each) with no register
    spills; the builds' stdout, for further checks."""
    stdout = run_sm90_builds(script, configs, tmp_path, **env_overrides)
    assert stdout.count("CONFIG") == len(configs)
    assert spill_stores(stdout) == [0] * len(configs), f"register spills on sm_90: {stdout[-3000:]}"
    return stdout
