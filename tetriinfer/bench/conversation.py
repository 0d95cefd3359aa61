"""Multi-turn chat sessions as an open-loop request stream (the `conversation` workload).

A session is one ShareGPT record's human->gpt pairs in turn order; each turn's prompt is the whole
history so far (as a chat API resends it) and its output the gpt reply. Sessions start by a `poisson`
or `bursty` process; within a session the next turn arrives after the previous turn's estimated reply
time (output tokens x `REPLY_S_PER_TOKEN`) plus an exponential think time of mean `THINK_TIME_S`.

Prefix block ids (`turn_hash_ids`): a session's text only grows, so block i of any turn's prompt is
block i of the conversation; it is named (session, i), and a turn's leading full blocks are the
previous turn's prompt + answer blocks. Sessions are numbered as played, so a session drawn twice
is two conversations.

This is an open-loop approximation: a real user waits for the actual reply, so a slow server would
delay the next turn; here turn times are fixed in advance, whatever the server's latency.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tetriinfer.bench.arrivals import gap_sampler

THINK_TIME_S = 5.0  # mean time a user reads the reply and types the next turn
REPLY_S_PER_TOKEN = 0.020  # estimated decode time per output token of the previous turn

Session = Sequence[tuple[int, int]]  # (prompt tokens with history, output tokens) per turn


def plan_conversations(
    sessions: Sequence[Session],
    num_requests: int,
    arrival: str,
    rate: float,
    rng: random.Random,
    max_total_tokens: int | None = None,
) -> list[list[tuple[float, int, int]]]:
    """(arrival_s, prompt, output) of each turn, session by session: `num_requests` turns in all.

    Whole sessions are taken in a seeded shuffle (reshuffled if more turns are needed than exist),
    the last one truncated. A session ends before its first turn whose prompt + output exceed
    `max_total_tokens`. Sessions start `mean turns / rate` apart on average, so that the overall
    request rate is about `rate` requests/s.
    """
    chosen = _choose(sessions, num_requests, rng, max_total_tokens)
    next_start = gap_sampler(arrival, rate * len(chosen) / num_requests, rng)
    planned, start = [], 0.0
    for turns in chosen:
        now, session = start, []
        for p, o in turns:
            if session:
                now += session[-1][2] * REPLY_S_PER_TOKEN + rng.expovariate(1.0 / THINK_TIME_S)
            session.append((now, p, o))
        planned.append(session)
        start += next_start()
    return planned


def _choose(sessions: Sequence[Session], n: int, rng: random.Random, cap: int | None) -> list[Session]:
    usable = [s for s in (_capped(s, cap) for s in sessions) if s]
    if not usable:
        raise ValueError(f"no conversation has a first turn with prompt + output <= {cap} tokens")
    chosen, total = [], 0
    while total < n:
        order = list(range(len(usable)))
        rng.shuffle(order)
        for i in order[: n - total]:  # each session has >= 1 turn: n - total sessions are enough
            take = usable[i][: n - total]
            chosen.append(take)
            total += len(take)
            if total == n:
                break
    return chosen


def _capped(turns: Session, cap: int | None) -> Session:
    if cap is not None:
        for k, (p, o) in enumerate(turns):
            if p + o > cap:
                return turns[:k]
    return turns


def turn_hash_ids(session: int, prompt_tokens: int, block_tokens: int) -> tuple[int, ...]:
    """Ids of a turn's prompt blocks (a last partial block included): block i of session s is
    `s * 2**20 + i`, the same id in every turn that reaches it."""
    return tuple((session << 20) + i for i in range(-(-prompt_tokens // block_tokens)))
