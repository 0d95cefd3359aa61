"""Measured step-time profiles: the JSON file the engine writes on a real GPU (docs/profile-format.md).

A profile holds two grids of forward-pass times, one for prefill chunks (chunk tokens x cached context)
and one for decode steps (batch size x context per sequence), plus the instance's KV size and capacity.
`TableCostModel` (sim/cost.py) interpolates in them.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

PROFILE_FORMAT = "tetriinfer.profile"
PROFILE_VERSION = 1
REQUIRED_METADATA = ("device", "model", "dtype", "commit")


class ProfileError(ValueError):
    """A profile file that does not follow docs/profile-format.md."""


@dataclass(frozen=True)
class Grid2D:
    """Values over a rectangular grid, `values[i][j]` at (`rows[i]`, `cols[j]`), both axes increasing.

    Bilinear interpolation inside; outside, a point below an axis takes the first grid line and a point
    above it extrapolates the last segment linearly (step times grow about linearly in both axes).
    """

    rows: tuple[float, ...]
    cols: tuple[float, ...]
    values: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        for axis_name, axis in (("rows", self.rows), ("cols", self.cols)):
            if not axis:
                raise ProfileError(f"grid axis {axis_name} is empty")
            if any(b <= a for a, b in zip(axis, axis[1:])):
                raise ProfileError(f"grid axis {axis_name} must be strictly increasing, got {list(axis)}")
        if len(self.values) != len(self.rows) or any(len(row) != len(self.cols) for row in self.values):
            raise ProfileError(
                f"grid values must be {len(self.rows)} rows of {len(self.cols)} numbers "
                f"(one row per entry of the first axis)"
            )
        if any(not v > 0 for row in self.values for v in row):
            raise ProfileError("grid step times must all be positive")

    def __call__(self, row: float, col: float) -> float:
        i, wi = _segment(self.rows, row)
        j, wj = _segment(self.cols, col)
        low_row, high_row = self.values[i], self.values[i + 1] if len(self.rows) > 1 else self.values[i]
        if len(self.cols) > 1:
            low = low_row[j] + (low_row[j + 1] - low_row[j]) * wj
            high = high_row[j] + (high_row[j + 1] - high_row[j]) * wj
        else:
            low, high = low_row[0], high_row[0]
        value = low + (high - low) * wi
        return value if value > 0.0 else 0.0


def _segment(axis: tuple[float, ...], x: float) -> tuple[int, float]:
    """Index of the segment's first point and x's weight toward the next point (> 1 past the end)."""
    if len(axis) == 1 or x <= axis[0]:
        return 0, 0.0
    i = bisect.bisect_right(axis, x) - 1
    if i > len(axis) - 2:
        i = len(axis) - 2
    return i, (x - axis[i]) / (axis[i + 1] - axis[i])


@dataclass(frozen=True)
class Profile:
    metadata: dict
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    prefill: Grid2D  # rows: chunk tokens, cols: cached context tokens
    decode: Grid2D  # rows: batch size, cols: context tokens per sequence
    extra: dict = field(default_factory=dict)  # unknown top-level keys, kept for round trips

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        if data.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"'format' must be {PROFILE_FORMAT!r}, got {data.get('format')!r}")
        if data.get("version") != PROFILE_VERSION:
            raise ProfileError(
                f"unsupported profile version {data.get('version')!r}; this reader knows {PROFILE_VERSION}"
            )
        metadata = _require(data, "metadata", dict)
        missing = [key for key in REQUIRED_METADATA if key not in metadata]
        if missing:
            raise ProfileError(f"metadata lacks {', '.join(missing)}")
        known = {"format", "version", "metadata", "kv_bytes_per_token", "kv_capacity_tokens", "prefill", "decode"}
        return cls(
            metadata=metadata,
            kv_bytes_per_token=_positive_int(data, "kv_bytes_per_token"),
            kv_capacity_tokens=_positive_int(data, "kv_capacity_tokens"),
            prefill=_grid(data, "prefill", "chunk_tokens", "context_tokens"),
            decode=_grid(data, "decode", "batch_size", "context_per_seq"),
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_dict(self) -> dict:
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "metadata": self.metadata,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "prefill": {
                "chunk_tokens": list(self.prefill.rows),
                "context_tokens": list(self.prefill.cols),
                "step_time_s": [list(row) for row in self.prefill.values],
            },
            "decode": {
                "batch_size": list(self.decode.rows),
                "context_per_seq": list(self.decode.cols),
                "step_time_s": [list(row) for row in self.decode.values],
            },
            **self.extra,
        }


def load_profile(path: str | Path) -> Profile:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON ({exc})") from exc
    try:
        return Profile.from_dict(data)
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from exc


def save_profile(profile: Profile, path: str | Path) -> None:
    text = json.dumps(profile.to_dict(), indent=1)
    # One line per list of numbers, so a grid reads as a table.
    text = re.sub(r"\[\s+([-+0-9.eE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    Path(path).write_text(text + "\n")


def _require(data: dict, key: str, kind: type):
    if key not in data:
        raise ProfileError(f"missing key {key!r}")
    if not isinstance(data[key], kind):
        raise ProfileError(f"{key!r} must be a {kind.__name__}, got {type(data[key]).__name__}")
    return data[key]


def _positive_int(data: dict, key: str) -> int:
    value = _require(data, key, int)
    if value < 1:
        raise ProfileError(f"{key!r} must be >= 1, got {value}")
    return value


def _grid(data: dict, key: str, row_key: str, col_key: str) -> Grid2D:
    section = _require(data, key, dict)
    try:
        return Grid2D(
            rows=_numbers(_require(section, row_key, list), row_key),
            cols=_numbers(_require(section, col_key, list), col_key),
            values=tuple(_numbers(row, "step_time_s") for row in _require(section, "step_time_s", list)),
        )
    except ProfileError as exc:
        raise ProfileError(f"{key}: {exc}") from exc


def _numbers(values, name: str) -> tuple[float, ...]:
    if not isinstance(values, list) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in values
    ):
        raise ProfileError(f"{name!r} must be a list of numbers")
    return tuple(values)


def tabulate(
    cost_model,
    metadata: dict,
    chunk_tokens: list[int],
    context_tokens: list[int],
    batch_sizes: list[int],
    context_per_seq: list[int],
) -> Profile:
    """A profile sampled from any cost model on the given grids (a synthetic stand-in for a measured
    profile, or a way to freeze a roofline's numbers into a file)."""
    def seconds(t: float) -> float:
        return round(t, 7)  # 0.1 us: finer than any measurement

    prefill = tuple(tuple(seconds(cost_model.step_time(n, c, 0, 0)) for c in context_tokens) for n in chunk_tokens)
    decode = tuple(
        tuple(seconds(cost_model.step_time(0, 0, b, b * c)) for c in context_per_seq) for b in batch_sizes
    )
    return Profile(
        metadata=metadata,
        kv_bytes_per_token=cost_model.kv_bytes_per_token(),
        kv_capacity_tokens=cost_model.kv_capacity_tokens(),
        prefill=Grid2D(tuple(chunk_tokens), tuple(context_tokens), prefill),
        decode=Grid2D(tuple(batch_sizes), tuple(context_per_seq), decode),
    )
