"""Global scheduler: each arriving request goes to the least-loaded prefill instance.

Load is the prompt tokens queued there and not yet prefilled (DESIGN.md). The scheduler sees the
monitor's snapshot plus what it has itself sent since, which is all a real controller knows.

Cache-aware (with a `PrefixIndex` and the request's prefix keys): an instance's price is its queued
tokens plus the prompt tokens it would still compute, i.e. less what it caches of this prompt, so a
long cached prefix beats a short queue and a long queue beats a small hit (Mooncake's conductor and
SGLang's cache-aware router weigh the same two). The index is the scheduler's guess: what it routed
where. Without an index or keys, this is least-loaded placement exactly.

Ties (most often: every queue empty, a light load whose prompts prefill within one monitor
interval) go to the instance running the fewest requests, then to snapshot order. Without that a
colocated cluster sent two thirds of a conversation trace to its first instance and almost nothing
to its last, each holding its requests' decodes to the end.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

from tetriinfer.sched.prefix_index import PrefixIndex, cached_tokens


class GlobalScheduler:
    def __init__(self, instance_ids: list[Hashable], prefix_index: PrefixIndex | None = None) -> None:
        self._load: dict[Hashable, int] = {i: 0 for i in instance_ids}
        self._running: dict[Hashable, int] = {i: 0 for i in instance_ids}
        self.prefix_index = prefix_index

    def update(self, loads: Mapping[Hashable, int], running: Mapping[Hashable, int] | None = None) -> None:
        """Replace the view with a monitor snapshot (queued prompt tokens and, for ties, requests
        running there; absent: 0); instances absent from `loads` are no longer eligible."""
        self._load = dict(loads)
        running = running or {}
        self._running = {i: running.get(i, 0) for i in self._load}

    def least_loaded(self) -> tuple[Hashable, int] | None:
        """(instance, queued prompt tokens) of the least-loaded instance; None when there is none.
        Ties go to the fewest running requests, then to the first in snapshot order (deterministic)."""
        if not self._load:
            return None
        instance = min(self._load, key=lambda i: (self._load[i], self._running[i]))
        return instance, self._load[instance]

    def best(self, prompt_tokens: int, prefix_keys: Sequence[Hashable] = (),
             block_tokens: int = 0) -> tuple[Hashable, int, int] | None:
        """(instance, queued tokens, cached tokens) of the cheapest instance for this prompt: the
        fewest queued + uncached tokens (ties: snapshot order); None when there is none."""
        if self.prefix_index is None or not prefix_keys:
            least = self.least_loaded()
            return None if least is None else (least[0], least[1], 0)
        best = None
        for instance, load in self._load.items():
            cached = cached_tokens(self.prefix_index, instance, prefix_keys, block_tokens, prompt_tokens)
            price = (load - cached, self._running[instance])
            if best is None or price < best_price:
                best, best_price = (instance, load, cached), price
        return best

    def pick(self, prompt_tokens: int, prefix_keys: Sequence[Hashable] = (), block_tokens: int = 0) -> Hashable:
        """Send a request there: the view counts its uncached tokens until the next snapshot, and
        the index (if any) records its keys there."""
        best = self.best(prompt_tokens, prefix_keys, block_tokens)
        if best is None:
            raise RuntimeError("no prefill instance is available")
        instance, _, cached = best
        self._load[instance] += prompt_tokens - cached
        self._running[instance] += 1
        if self.prefix_index is not None and prefix_keys:
            self.prefix_index.record(instance, prefix_keys)
        return instance
