"""The KV hand-off between a prefill instance P and a decode instance D: P's half in
`handoff.prefill`, D's in `handoff.decode`, both mixed into `cluster.instance.Instance` (their state
lives there). Messages in `cluster.messages`, bytes through `cluster.kv`.

    P: prefill done -> predict -> dispatcher picks D -> KVOffer(offer_id)
    D: queue it for admission -> KVHold (renewed every kv_timeout/3 while it waits: a lease)
    D: admission allows -> pin the cached run of the offer's block keys, reserve blocks for the
       rest -> KVReady(transfer_id, offer_id, skip_tokens)
    P: export KV from skip_tokens on (frees P's blocks) -> start_send -> KVPush(state, descriptor)
    D: recv into the reserved blocks -> import (table: pinned + new) -> KVDone; tokens now stream from D.
    P, no KVReady yet and D gone from the address book or its lease lapsed: KVCancel(-1) to D, stop
       offering to D for 2 x kv_timeout, place the request again (another D; adaptive: maybe P).

Every wait has a deadline, all of `--kv-timeout` (`InstanceConfig.kv_timeout_s`):
- an offer P made waits for D's answer under a lease: D answers KVHold at once and renews it every
  third of the timeout while the offer waits for admission; a lease that lapses (D froze, or died
  before the controller noticed) or a D that leaves the address book (the controller found it
  dead) makes P take the offer back, stop offering to that D for two timeouts, and place the
  request again from the dispatch queue (another D, or, adaptive, decoding it on P);
- a prefilled request with no decode instance to go to fails after one timeout;
- D drops blocks reserved for KV that never comes; P fails a send not acknowledged in time.
D receives only the transfers it issued (id and sender as in its KVReady), and checks the size.
Any failure frees what each side holds and ends the request with an error delta to the API. D's
pinned prefix blocks are part of the reserved table, so every path that frees the reservation
unpins them (they stay cached).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TransferCounters:
    """KV moved by one side of the hand-off since start (counters for /metrics)."""

    bytes: int = 0
    seconds: float = 0.0
    count: int = 0
    failures: int = 0
    skipped_tokens: int = 0  # decode side: context tokens whose KV it held already (prefix cache)
