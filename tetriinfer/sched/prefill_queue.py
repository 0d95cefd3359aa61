"""Prefill queue: the order in which queued prompts reach the chunker.

The paper's prefill scheduler sorts a *batch* of at most `sort_window` queued requests
(`PrefillSchedBatch`) and feeds the chunker from it; requests arriving meanwhile wait for the next
batch, so SJF/LJF reorder only within a window and a long prompt cannot starve forever. When the
ordered batch holds fewer tokens than a chunk, the next window is sorted and appended behind it, so
chunks stay full.
"""

from __future__ import annotations

from collections import deque
from typing import Hashable, Iterator, Protocol

from tetriinfer.sched.chunker import Chunk, next_chunk

PREFILL_POLICIES = ("fcfs", "sjf", "ljf")


class QueuedPrompt(Protocol):
    """What the queue reads and advances of a request (the chunker's `PendingPrefill`, writable)."""

    request_id: Hashable
    prompt_len: int
    num_prefilled: int


class PrefillQueue:
    def __init__(self, policy: str = "fcfs", sort_window: int = 16) -> None:
        if policy not in PREFILL_POLICIES:
            raise ValueError(f"policy must be one of {PREFILL_POLICIES}, got {policy!r}")
        if sort_window < 1:
            raise ValueError(f"sort_window must be >= 1, got {sort_window}")
        self.policy = policy
        self.sort_window = sort_window
        self._arrived: deque[QueuedPrompt] = deque()  # FIFO, not yet sorted
        self._ordered: deque[QueuedPrompt] = deque()  # sorted windows, the chunker's input
        self._ordered_tokens = 0
        self.pending_tokens = 0  # prompt tokens not yet prefilled: the global scheduler's load

    def __len__(self) -> int:
        return len(self._arrived) + len(self._ordered)

    def add(self, request: QueuedPrompt, *, front: bool = False) -> None:
        """Queue a request; `front=True` puts it first, past any sorting (one preempted by
        recompute goes first, as in vLLM)."""
        remaining = request.prompt_len - request.num_prefilled
        if front:
            self._ordered.appendleft(request)
            self._ordered_tokens += remaining
        else:
            self._arrived.append(request)
        self.pending_tokens += remaining

    def restart_newest_started(self) -> tuple[QueuedPrompt, int] | None:
        """Send the newest partly prefilled request back to its first token (its KV is given up to
        make room): return it with the tokens it had, or None when no request has started."""
        for request in reversed(self._ordered):
            if request.num_prefilled > 0:
                done, request.num_prefilled = request.num_prefilled, 0
                self._ordered_tokens += done
                self.pending_tokens += done
                return request, done
        return None

    def remove(self, request_id: Hashable) -> bool:
        """Drop a queued request (aborted); False if it is not here."""
        for queue in (self._arrived, self._ordered):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    remaining = request.prompt_len - request.num_prefilled
                    self.pending_tokens -= remaining
                    if queue is self._ordered:
                        self._ordered_tokens -= remaining
                    return True
        return False

    def ordered(self, min_tokens: int) -> Iterator[QueuedPrompt]:
        """Requests in scheduling order, sorting new windows until `min_tokens` are covered."""
        self._sort_until(min_tokens)
        return iter(self._ordered)

    def next_chunk(self, chunk_size: int, pad: bool = True) -> Chunk:
        """The next chunk; `commit` it once its forward pass is done."""
        return next_chunk(self.ordered(chunk_size), chunk_size, pad)

    def commit(self, chunk: Chunk) -> list[QueuedPrompt]:
        """Advance the prompts `chunk` covered; return those now fully prefilled, in order."""
        done: list[QueuedPrompt] = []
        for piece in chunk.pieces:
            request = self._ordered[0] if self._ordered else None
            if request is None or request.request_id != piece.request_id or request.num_prefilled != piece.start:
                raise ValueError(f"chunk piece {piece} is not the head of the queue")
            request.num_prefilled = piece.end
            self._ordered_tokens -= piece.length
            self.pending_tokens -= piece.length
            if request.num_prefilled >= request.prompt_len:
                done.append(self._ordered.popleft())
        return done

    def take(self, min_tokens: int) -> list[QueuedPrompt]:
        """Remove and return whole requests from the head, in scheduling order, until they cover
        `min_tokens` prompt tokens (or the queue is empty): for a caller that runs the prompts
        elsewhere (an engine's own chunker) but keeps this queue's order."""
        taken: list[QueuedPrompt] = []
        covered = 0
        self._sort_until(min_tokens)
        while self._ordered and covered < min_tokens:
            request = self._ordered.popleft()
            remaining = request.prompt_len - request.num_prefilled
            self._ordered_tokens -= remaining
            self.pending_tokens -= remaining
            covered += remaining
            taken.append(request)
        return taken

    def _sort_until(self, min_tokens: int) -> None:
        while self._ordered_tokens < min_tokens and self._arrived:
            self._sort_next_window()

    def _sort_next_window(self) -> None:
        take = min(self.sort_window, len(self._arrived))
        window = [self._arrived.popleft() for _ in range(take)]
        if self.policy != "fcfs":
            # Stable sort: equal lengths keep arrival order.
            window.sort(key=lambda r: r.prompt_len - r.num_prefilled, reverse=self.policy == "ljf")
        self._ordered.extend(window)
        self._ordered_tokens += sum(r.prompt_len - r.num_prefilled for r in window)
