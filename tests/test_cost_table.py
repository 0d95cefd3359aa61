"""The measured-profile cost model: file format, interpolation, and errors on bad files."""

import json
from pathlib import Path

import pytest

from tetriinfer.sim.cost import CostModel, RooflineCostModel, TableCostModel
from tetriinfer.sim.profile import Grid2D, ProfileError, load_profile, save_profile, tabulate

EXAMPLE = Path(__file__).parent / "data" / "profile_example.json"


@pytest.fixture(scope="module")
def table():
    return TableCostModel.from_file(EXAMPLE, link_gbps=100.0, link_latency_s=0.0)


def test_example_profile_loads_with_metadata(table):
    assert isinstance(table, CostModel)
    meta = table.profile.metadata
    assert meta["model"] == "llama3-8b" and meta["dtype"] == "bfloat16" and meta["commit"]
    assert table.kv_bytes_per_token() == 131072
    assert table.kv_capacity_tokens() == 456154
    assert table.transfer_time(10**9) == pytest.approx(0.08)


def test_grid_points_are_returned_exactly(table):
    raw = json.loads(EXAMPLE.read_text())
    prefill, decode = raw["prefill"], raw["decode"]
    for i, chunk in enumerate(prefill["chunk_tokens"]):
        for j, context in enumerate(prefill["context_tokens"]):
            assert table.step_time(chunk, context, 0, 0) == pytest.approx(prefill["step_time_s"][i][j])
    for i, batch in enumerate(decode["batch_size"]):
        for j, context in enumerate(decode["context_per_seq"]):
            assert table.step_time(0, 0, batch, batch * context) == pytest.approx(decode["step_time_s"][i][j])


def test_example_was_sampled_from_the_roofline_it_names(table):
    roofline = RooflineCostModel.from_names("h100", "llama3-8b")
    assert table.step_time(512, 2048, 0, 0) == pytest.approx(roofline.step_time(512, 2048, 0, 0), rel=1e-4)


def test_interpolation_is_bilinear_between_points():
    grid = Grid2D(rows=(0, 10), cols=(0, 100), values=((1.0, 2.0), (3.0, 4.0)))
    assert grid(5, 50) == pytest.approx(2.5)
    assert grid(10, 50) == pytest.approx(3.5)
    assert grid(2, 0) == pytest.approx(1.4)


def test_outside_the_grid_clamps_below_and_extrapolates_above():
    grid = Grid2D(rows=(1, 2), cols=(10, 20), values=((1.0, 2.0), (2.0, 3.0)))
    assert grid(0, 10) == pytest.approx(1.0)  # below the first row: the first row
    assert grid(1, 5) == pytest.approx(1.0)
    assert grid(4, 10) == pytest.approx(4.0)  # past the last row: the last segment's slope
    assert grid(1, 40) == pytest.approx(4.0)


def test_table_tracks_the_roofline_between_grid_points(table):
    # Step times are nearly linear in both axes, so a coarse grid predicts off-grid points closely.
    roofline = RooflineCostModel.from_names("h100", "llama3-8b")
    for args in ((1000, 1000, 0, 0), (300, 4000, 0, 0), (0, 0, 100, 100 * 700), (0, 0, 30, 30 * 3000)):
        assert table.step_time(*args) == pytest.approx(roofline.step_time(*args), rel=0.1), args


def test_mixed_step_costs_more_than_either_part(table):
    prefill = table.step_time(512, 0, 0, 0)
    decode = table.step_time(0, 0, 64, 64 * 2048)
    mixed = table.step_time(512, 0, 64, 64 * 2048)
    assert mixed > prefill and mixed > decode
    assert mixed < prefill + decode  # the weights are read once


def test_round_trip_keeps_everything(tmp_path):
    roofline = RooflineCostModel.from_names("a100", "qwen2.5-7b")
    meta = {"device": "x", "model": "qwen2.5-7b", "dtype": "bfloat16", "commit": "abc", "block_size": 16}
    profile = tabulate(roofline, meta, [256, 512], [0, 1024], [1, 16], [256, 2048])
    path = tmp_path / "p.json"
    save_profile(profile, path)
    assert load_profile(path) == profile


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d["metadata"].pop("commit"), "metadata lacks commit"),
        (lambda d: d.pop("kv_capacity_tokens"), "kv_capacity_tokens"),
        (lambda d: d["prefill"].update(chunk_tokens=[512, 128, 2048, 8192]), "strictly increasing"),
        (lambda d: d["decode"]["step_time_s"].pop(), "rows"),
        (lambda d: d["decode"]["step_time_s"][0].__setitem__(0, -1.0), "positive"),
        (lambda d: d["prefill"].update(context_tokens="0,2048"), "list"),
    ],
)
def test_bad_profiles_are_rejected_with_the_reason(tmp_path, edit, message):
    data = json.loads(EXAMPLE.read_text())
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(ProfileError, match="broken.json"):
        load_profile(path)


def test_single_point_axes_hold_their_value_along_that_axis():
    assert Grid2D((1,), (5,), ((2.0,),))(9, 9) == 2.0
    assert Grid2D((1, 2), (5,), ((2.0,), (4.0,)))(1.5, 100) == pytest.approx(3.0)
    assert Grid2D((1,), (5, 6), ((2.0, 3.0),))(100, 5.5) == pytest.approx(2.5)
