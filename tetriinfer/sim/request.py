"""A request's state inside the simulator (one mutable object per request, slots for speed)."""

from __future__ import annotations


class SimRequest:
    __slots__ = (
        "request_id", "arrival_s", "prompt_tokens", "output_tokens",
        # chunker protocol: KV tokens to compute before decoding (prompt, or the whole context
        # again after a recompute preemption) and how many of them are done
        "prompt_len", "num_prefilled",
        "prefill_start_s", "first_token_s", "finish_s",
        "bucket", "heavy", "need_blocks", "reserve_blocks", "predicted_output",  # set once predicted
        "kv_len", "decode_left", "recomputing", "kv_local",  # decode progress
        "hash_ids", "cached_tokens",  # prefix blocks (full ones only) and the prompt tokens a cache served
        # RunningBatch bookkeeping
        "batch_epoch", "batch_step0", "batch_kv0", "batch_reserve",
    )

    def __init__(self, request_id: int, arrival_s: float, prompt_tokens: int, output_tokens: int,
                 hash_ids: tuple = ()) -> None:
        self.request_id = request_id
        self.arrival_s = arrival_s
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.prompt_len = prompt_tokens
        self.num_prefilled = 0
        self.prefill_start_s: float | None = None
        self.first_token_s: float | None = None
        self.finish_s: float | None = None
        self.bucket: int | None = None
        self.heavy = False
        self.need_blocks = 0
        self.reserve_blocks = 0
        self.predicted_output = output_tokens
        self.kv_len = prompt_tokens
        # The prefill samples the first token; each decode step samples one more.
        self.decode_left = output_tokens - 1
        self.recomputing = False
        self.kv_local = False  # its KV already sits on the decode instance (it was prefilled there)
        self.hash_ids = hash_ids
        self.cached_tokens = 0
        self.batch_epoch = 0
        self.batch_step0 = 0
        self.batch_kv0 = 0
        self.batch_reserve = 0

    def predicted_decode_left(self) -> int:
        """Decode steps left if the output is as long as predicted (the admission reservation)."""
        return self.predicted_output - 1 - (self.kv_len - self.prompt_tokens)
