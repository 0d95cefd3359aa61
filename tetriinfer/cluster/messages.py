"""Every message between the cluster's processes, as typed msgspec structs over ZeroMQ.

Each process binds one PULL socket (its inbox) and PUSHes to the inboxes of the others; a frame
is one `Message`, encoded with msgpack. Who sends what:

    API        -> controller : Submit, Abort, Shutdown
    controller -> instance   : Submit (routed), Abort, Snapshot, Flip, Shutdown, Register
    controller -> API        : Routed, InstanceDied, ClusterStats, ClusterReady
    instance   -> controller : Ready, InstanceStats, FlipDone
    instance   -> API        : TokenBatch (tokens stream straight from the instance that made them)
    instance   -> instance   : KVOffer, KVHold, KVReady, KVCancel, KVPush, KVDone (the KV bytes go through `cluster.kv`)
"""

from __future__ import annotations

import msgspec

from tetriinfer.engine.serving import RequestState
from tetriinfer.sampling_params import SamplingParams
from tetriinfer.sched.dispatcher import DecodeLoad


class Submit(msgspec.Struct, tag=True):
    """`local`: routed to a decode instance that prefills it itself, then decodes it (no KV moves)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prompt: str | None = None
    local: bool = False


class Abort(msgspec.Struct, tag=True):
    request_id: str
    reason: str = "aborted"


class Shutdown(msgspec.Struct, tag=True):
    pass


class Routed(msgspec.Struct, tag=True):
    """The controller placed a request on a (prefill or colocated) instance."""

    request_id: str
    instance_id: int


class TokenDelta(msgspec.Struct, array_like=True):
    """New output of one request since its last delta. `finish_reason` ("stop", "length", "abort",
    "error") ends the request; `error` says why for "error". A delta without tokens only moves the
    request's ownership to `instance_id` (its KV arrived there, after `output_offset` tokens)."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache (on the first token's delta)
    # SamplingParams.logprobs = N > 0: per new token, its N best (token id, logprob).
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # SamplingParams.prompt_logprobs, on the first token's delta: per prompt token (None / [] for
    # the first), its logprob and its N best.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_ranks: list[int | None] | None = None  # each prompt token's rank (1: the likeliest), None first
    # On an ownership delta: the output tokens the previous owner streamed before the hand-off (the
    # API holds the new owner's deltas until it has them all: they travel on another socket).
    output_offset: int | None = None

    @classmethod
    def ended(cls, request_id: str, reason: str, error: str) -> "TokenDelta":
        """The last delta of a request that ends without output: `reason` is "error" or "abort"."""
        return cls(request_id, [], "", None, reason, None, error)


class TokenBatch(msgspec.Struct, tag=True):
    instance_id: int
    deltas: list[TokenDelta]


class PredictorStats(msgspec.Struct, array_like=True):
    """An instance's online length predictor (predictor.online.OnlineStats), for /metrics."""

    num_labels: int  # finished requests it learned from (counter)
    online_accuracy: float | None  # served-bucket accuracy on the recent labels
    predicted_buckets: list[int]  # predictions per bucket (counters)
    num_unpaired: int = 0  # the probe: labels whose hidden state was not kept, not learned (counter)


class InstanceStats(msgspec.Struct, tag=True):
    """What an instance reports every monitor interval (and its heartbeat)."""

    instance_id: int
    role: str  # sched.monitor.PREFILL / DECODE / COLOCATED
    address: str  # its inbox
    pid: int
    draining: bool
    load_fraction: float
    queued_prompt_tokens: int  # the global scheduler's load
    num_waiting: int  # queued for prefill (prefill, colocated) or for admission (decode)
    num_running: int
    num_dispatch_waiting: int  # prefilled, no decode instance with room yet
    kv_blocks_total: int
    kv_blocks_used: int
    decode_load: DecodeLoad | None  # decode role: what the dispatchers place by (sched.dispatcher)
    kv_transfer_bytes: int  # totals since start (counters)
    kv_transfer_seconds: float
    kv_transfers: int
    kv_transfer_failures: int
    num_local_prefills: int = 0  # decode role: requests it prefilled itself (adaptive)
    num_kept_decodes: int = 0  # prefill role: requests it decoded itself (adaptive)
    step_stats: list[float] = msgspec.field(default_factory=list)  # sched.step_cost.StepStats.to_list()
    kv_redispatches: int = 0  # prefill role: offers withdrawn from a decode instance that died or went silent
    kv_pushes_refused: int = 0  # decode role: KVPush for a transfer it never issued to that sender
    send_failures: int = 0  # messages this instance could not send (cluster.zmq_io.Outboxes.failures)
    prefix_queried_tokens: int = 0  # prompt tokens of the requests it prefilled (counter)
    prefix_hit_tokens: int = 0  # of those, served from its prefix cache (counter)
    kv_blocks_cached: int = 0  # blocks held by no request, kept for prefix hits (evictable)
    predictor: PredictorStats | None = None  # online length predictor (prefill-capable roles)
    kv_transfer_skipped_tokens: int = 0  # decode role: KV tokens it held in its prefix cache, not moved (counter)


class Ready(msgspec.Struct, tag=True):
    instance_id: int
    address: str
    pid: int
    role: str
    max_model_len: int


class Register(msgspec.Struct, tag=True):
    """A restarted controller to an instance it hears from but does not know: send Ready again."""


class ClusterReady(msgspec.Struct, tag=True):
    num_instances: int
    max_model_len: int


class Snapshot(msgspec.Struct, tag=True):
    """The monitor's broadcast: decode loads for the dispatchers, and the address book."""

    time_s: float
    decode_loads: list[DecodeLoad]
    addresses: dict[int, str]
    step_cost: list[float] = msgspec.field(default_factory=list)  # sched.step_cost.LinearStepCost coefficients


class Flip(msgspec.Struct, tag=True):
    to_role: str


class FlipDone(msgspec.Struct, tag=True):
    instance_id: int
    role: str
    drain_s: float  # order to drained
    switch_s: float  # drained to serving in the new role


class InstanceDied(msgspec.Struct, tag=True):
    instance_id: int
    reason: str


class ClusterStats(msgspec.Struct, tag=True):
    """The controller's view, for /metrics: latest stats per live instance plus cluster counters."""

    instances: list[InstanceStats]
    num_flips: int
    last_flip_s: float | None
    dead_instances: list[int]


class KVOffer(msgspec.Struct, tag=True):
    """Prefill -> decode: a prefilled request the dispatcher picked this instance for. `offer_id`
    (unique per prefill instance) tells this offer's answers from those of an earlier one."""

    request_id: str
    src_instance: int
    num_cached_tokens: int
    need_blocks: int  # prompt + predicted output (lower bound): what the dispatcher placed
    reserve_blocks: int  # prompt + predicted output (upper bound): what admission reserves
    heavy: bool
    predicted_decode_tokens: int
    offer_id: int = 0
    # The prefix cache's keys of its full KV blocks (engine.prefix_cache's hash chain, 32 bytes a
    # block; [] with prefix caching off): the decode instance skips the run of them it holds.
    block_keys: list[bytes] = msgspec.field(default_factory=list)


class KVHold(msgspec.Struct, tag=True):
    """Decode -> prefill: the offer waits for admission here. Sent at once and renewed while it
    waits: a lease. The prefill side takes back (and places again) an offer whose lease lapses, so
    a decode instance that froze or died before answering holds no request for long."""

    request_id: str
    dst_instance: int
    offer_id: int


class KVReady(msgspec.Struct, tag=True):
    """Decode -> prefill: blocks are reserved; push the KV from token `skip_tokens` on (the decode
    instance holds the blocks before it in its prefix cache, pinned for this request)."""

    request_id: str
    dst_instance: int
    transfer_id: int
    offer_id: int = 0
    skip_tokens: int = 0


class KVCancel(msgspec.Struct, tag=True):
    """Either side gives a transfer up (request aborted or failed): the other frees what it holds.
    `transfer_id` -1: the whole offer (prefill -> decode: taken back; decode -> prefill: declined)."""

    request_id: str
    transfer_id: int
    reason: str


class KVPush(msgspec.Struct, tag=True):
    """Prefill -> decode: the request's state; the K/V travel through the transport per `descriptor`.
    `sent_at`: the sender's clock when sent, to move the state's times onto the receiver's."""

    state: RequestState
    src_instance: int
    transfer_id: int
    descriptor: dict  # the transport's description of the sent tensors
    sent_at: float

    @property
    def request_id(self) -> str:
        return self.state.request_id


class LengthLabel(msgspec.Struct, tag=True):
    """Decode -> prefill: a request that prefill instance predicted finished with `output_len` tokens;
    its online length predictor learns from it (predictor.online), the probe with the hidden state
    that instance kept under `request_id` (cluster.length_labels)."""

    request_id: str
    prompt_token_ids: list[int]
    output_len: int


class KVDone(msgspec.Struct, tag=True):
    """Decode -> prefill: the KV landed (`ok`) or the request failed there (reported to the API)."""

    request_id: str
    transfer_id: int
    ok: bool
    seconds: float
    error: str | None


Message = (
    Submit | Abort | Shutdown | Routed | TokenBatch | InstanceStats | Ready | ClusterReady | Snapshot | Flip
    | FlipDone | InstanceDied | ClusterStats | KVOffer | KVHold | KVReady | KVCancel | KVPush | KVDone | Register
    | LengthLabel
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message) -> bytes:
    return _encoder.encode(message)


def decode(frame: bytes):
    return _decoder.decode(frame)
