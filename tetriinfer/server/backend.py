"""What the HTTP server needs of whatever serves the requests (the cluster, or a fake in tests).

The server tokenizes and validates; the backend runs requests and streams `TokenDelta`s whose
`text` is already detokenized (incrementally, by the instance that produced the tokens). A delta
with a `finish_reason` is the last one of its request; "error" carries the reason in `error`.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from tetriinfer.cluster.messages import ClusterStats, TokenDelta
from tetriinfer.model.tokenizer import Tokenizer
from tetriinfer.sampling_params import SamplingParams


class Backend(Protocol):
    model_name: str  # what /v1/models lists and requests must name
    max_model_len: int  # prompt + max_tokens may not exceed it
    vocab_size: int
    tokenizer: Tokenizer

    def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                 prompt: str | None = None) -> AsyncIterator[TokenDelta]:
        """Start a request; yields its deltas until one has a finish_reason. Closing the iterator
        early (client gone) must abort the request everywhere."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def cluster_stats(self) -> ClusterStats | None:
        """The latest cluster view for /metrics (None before the first report)."""
        ...

    def healthy(self) -> bool:
        """At least one instance of every needed role is alive."""
        ...
