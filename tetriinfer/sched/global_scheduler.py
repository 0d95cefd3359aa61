"""Global scheduler: each arriving request goes to the least-loaded prefill instance.

Load is the prompt tokens queued there and not yet prefilled (DESIGN.md). The scheduler sees the
monitor's snapshot plus what it has itself sent since, which is all a real controller knows.
"""

from __future__ import annotations

from typing import Hashable, Mapping


class GlobalScheduler:
    def __init__(self, instance_ids: list[Hashable]) -> None:
        self._load: dict[Hashable, int] = {i: 0 for i in instance_ids}

    def update(self, loads: Mapping[Hashable, int]) -> None:
        """Replace the view with a monitor snapshot; instances absent from it are no longer eligible."""
        self._load = dict(loads)

    def least_loaded(self) -> tuple[Hashable, int] | None:
        """(instance, queued prompt tokens) of the least-loaded instance; None when there is none.
        Ties go to the first instance in snapshot order, which keeps runs deterministic."""
        if not self._load:
            return None
        instance = min(self._load, key=self._load.__getitem__)
        return instance, self._load[instance]

    def pick(self, prompt_tokens: int) -> Hashable:
        least = self.least_loaded()
        if least is None:
            raise RuntimeError("no prefill instance is available")
        self._load[least[0]] += prompt_tokens
        return least[0]
