"""What the HTTP server needs of whatever serves the requests (the cluster, or a fake in tests).

The server tokenizes and validates; the backend runs requests and streams `TokenDelta`s whose
`text` is already detokenized (incrementally, by the instance that produced the tokens). A delta
with a `finish_reason` is the last one of its request; "error" carries the reason in `error`.
Errors that mean "not now" rather than "failed" (see `is_unavailable`) are answered 503.
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
    sampling_defaults: dict  # the model's generation_config.json defaults (model.loader.generation_defaults)

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


# The cluster's errors (cluster/controller.py, cluster/client.py) that mean it cannot take a request
# now, but may soon: answered 503 with Retry-After instead of 500. Matched on the message until
# TokenDelta carries a typed error kind.
SHUTTING_DOWN = "server shutting down"
CONTROLLER_DOWN = "the controller is restarting"
NOT_ROUTED = "the controller did not place the request in time"
UNAVAILABLE_ERRORS = ("no prefill instance is available", "the cluster is still starting", SHUTTING_DOWN,
                      CONTROLLER_DOWN, NOT_ROUTED, "no decode instance is available")


class Overloaded(Exception):
    """Raised by `generate` before anything starts: too many requests are waiting (a 429)."""


def is_unavailable(error: str) -> bool:
    return error in UNAVAILABLE_ERRORS
