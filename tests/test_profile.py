"""`tetriinfer profile` writes a profile the simulator's table cost model reads."""

from __future__ import annotations

import json

import pytest

from tetriinfer.cli import main as cli_main
from tetriinfer.engine.profiler import knee
from tetriinfer.sim.cost import TableCostModel


def test_profile_command_writes_a_loadable_profile(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    rc = cli_main(["profile", "--out", str(out), "--chunk-tokens", "16,32,64", "--context-tokens", "0,32",
                   "--batch-sizes", "1,3", "--context-per-seq", "8,40", "--repeats", "1", "--num-blocks", "64",
                   "--plot", str(tmp_path / "tiny.png")])
    assert rc == 0
    assert (tmp_path / "tiny.png").stat().st_size > 1000
    data = json.loads(out.read_text())
    assert data["metadata"]["model"] == "tiny" and data["metadata"]["recommended_chunk_size"] in (16, 32, 64)
    assert data["kv_capacity_tokens"] == 64 * 16
    assert len(data["prefill"]["step_time_s"]) == 3 and len(data["decode"]["step_time_s"][0]) == 2
    model = TableCostModel.from_file(out)
    assert model.step_time(32, 0, 0, 0) > 0 and model.step_time(0, 0, 3, 120) > 0
    assert "recommended chunk_size" in capsys.readouterr().out


def test_profile_rejects_a_grid_beyond_the_cache(tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["profile", "--out", str(tmp_path / "x.json"), "--chunk-tokens", "16", "--context-tokens", "0",
                  "--batch-sizes", "64", "--context-per-seq", "100", "--num-blocks", "8"])
    assert not (tmp_path / "x.json").exists()


def test_knee_is_where_doubling_stops_paying():
    chunks = [128, 256, 512, 1024, 2048]
    # throughput: 10k, 18k, 24k, 25k, 25.5k tokens/s
    seconds = [n / tp for n, tp in zip(chunks, [10e3, 18e3, 24e3, 25e3, 25.5e3])]
    assert knee(chunks, seconds) == 512
    assert knee(chunks, [n / 1e3 / (i + 1) for i, n in enumerate(chunks)]) == 2048  # never flattens
