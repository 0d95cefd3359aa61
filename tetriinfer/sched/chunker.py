"""Fixed-size chunked prefill (the paper's chunker).

A chunk holds exactly `chunk_size` prompt tokens taken from the front of a prefill queue, in queue
order: a prompt that does not fit is split and resumes in the next chunk from where it stopped.
When the queue runs dry the chunk is padded up to `chunk_size` (padding costs compute only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable, Protocol


class PendingPrefill(Protocol):
    """What the chunker reads of a queued request; it never mutates it."""

    @property
    def request_id(self) -> Hashable: ...

    @property
    def prompt_len(self) -> int: ...

    @property
    def num_prefilled(self) -> int: ...


@dataclass(frozen=True)
class ChunkPiece:
    """Prompt positions [start, start + length) of one request."""

    request_id: Hashable
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Chunk:
    pieces: tuple[ChunkPiece, ...]
    size: int  # tokens the forward pass computes: real tokens plus padding

    @property
    def num_tokens(self) -> int:
        return sum(p.length for p in self.pieces)

    @property
    def padding(self) -> int:
        return self.size - self.num_tokens


def next_chunk(queue: Iterable[PendingPrefill], chunk_size: int, pad: bool = True) -> Chunk:
    """Pack the next chunk from `queue` (already in scheduling order).

    With `pad=False` the chunk is only as large as the tokens it holds (used where a token budget,
    not a fixed shape, is the point: the chunked-colocated baseline).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    pieces: list[ChunkPiece] = []
    room = chunk_size
    for req in queue:
        if room == 0:
            break
        remaining = req.prompt_len - req.num_prefilled
        if remaining <= 0:
            continue
        take = min(remaining, room)
        pieces.append(ChunkPiece(req.request_id, req.num_prefilled, take))
        room -= take
    used = chunk_size - room
    return Chunk(tuple(pieces), chunk_size if pad and pieces else used)
