"""Checks the config dataclasses share."""

from __future__ import annotations


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_tensor_parallel_size(size: int) -> None:
    """One rule for the engine's knob and the simulator's (`ClusterConfig.tp`)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {size!r}")
