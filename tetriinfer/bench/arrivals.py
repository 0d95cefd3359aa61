"""Open-loop arrival processes: Poisson, and a bursty Gamma renewal process with the same mean rate.

`bursty` draws Gamma inter-arrival gaps with shape 1/cv^2 and mean 1/rate: the mean rate is the
Poisson one, but gaps have coefficient of variation `BURSTY_CV` (Poisson: 1), so requests come in
clumps separated by long lulls, as in production traces.
"""

from __future__ import annotations

import random
from collections.abc import Callable

OPEN_ARRIVALS = ("poisson", "bursty")
BURSTY_CV = 4.0


def check_rate(arrival: str, rate: float | None) -> None:
    if arrival in OPEN_ARRIVALS and (rate is None or rate <= 0):
        raise ValueError(f"{arrival} arrival needs rate > 0 requests/s, got {rate}")


def gap_sampler(arrival: str, rate: float, rng: random.Random) -> Callable[[], float]:
    """A function drawing one inter-arrival gap (seconds) of `arrival` at mean `rate` per second."""
    check_rate(arrival, rate)
    if arrival == "poisson":
        return lambda: rng.expovariate(rate)
    if arrival == "bursty":
        shape = 1.0 / BURSTY_CV**2
        return lambda: rng.gammavariate(shape, 1.0 / (rate * shape))
    raise ValueError(f"open-loop arrival must be one of {OPEN_ARRIVALS}, got {arrival!r}")


def open_arrivals(num_requests: int, arrival: str, rate: float, rng: random.Random) -> list[float]:
    """Arrival times of `arrival` (poisson or bursty) at mean `rate` per second; the first at t=0."""
    gap = gap_sampler(arrival, rate, rng)
    times, now = [], 0.0
    for _ in range(num_requests):
        times.append(now)
        now += gap()
    return times


def poisson_arrivals(num_requests: int, rate: float, rng: random.Random) -> list[float]:
    """Arrival times of a Poisson process at `rate` per second; the first request opens at t=0."""
    return open_arrivals(num_requests, "poisson", rate, rng)
