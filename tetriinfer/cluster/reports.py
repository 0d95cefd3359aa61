"""What an instance reports to the controller every `stats_interval_s` (also its heartbeat): the
monitor's view of it (`msg.InstanceStats`), mixed into `cluster.instance.Instance`."""

from __future__ import annotations

import os

from tetriinfer.cluster import messages as msg
from tetriinfer.sched.monitor import DECODE, decode_load_fraction, prefill_load_fraction


class InstanceReports:
    """The instance's report, read from its engine's load and its own counters."""

    def _stats(self) -> msg.InstanceStats:
        load = self.engine.load()
        used = load.used_blocks
        queued = self.queue.pending_tokens + load.waiting_tokens
        running = load.num_running
        if self.role == DECODE:
            fraction = decode_load_fraction(used, self.capacity_blocks, len(self.assigned), self.max_num_seqs)
            waiting = len(self.offers)
        else:
            fraction = prefill_load_fraction(queued, self.chunk_size, self.config.flip.prefill_pressure_chunks)
            waiting = len(self.queue) + load.num_waiting
        out, into = self.transfers_out, self.transfers_in
        return msg.InstanceStats(
            self.instance_id, self.role, self.inbox.address, os.getpid(), self.flip is not None, fraction, queued, waiting,
            running, len(self.dispatch_wait), self.capacity_blocks, used,
            self._decode_load(load) if self.role == DECODE else None,
            out.bytes + into.bytes, out.seconds + into.seconds, out.count + into.count, out.failures + into.failures,
            self.num_local_prefills, self.num_kept_decodes, self.step_stats.to_list(), self.num_redispatches,
            self.kv_pushes_refused, self.out.failures, self.prefix_queried_tokens, self.prefix_hit_tokens,
            load.cached_blocks, self._predictor_stats(), kv_transfer_skipped_tokens=into.skipped_tokens,
        )

    def _predictor_stats(self) -> msg.PredictorStats | None:
        stats = getattr(self.predictor, "stats", None)  # online predictors only
        if stats is None:
            return None
        s = stats()
        return msg.PredictorStats(s.num_labels, s.online_accuracy, s.predicted_buckets, s.num_unpaired)
