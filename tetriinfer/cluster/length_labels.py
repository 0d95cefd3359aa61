"""An instance's online length predictor: predictions for prefilled requests, and each finished
request's true length back to the predictor that predicted it (mixed into `cluster.instance.Instance`).

A request decoded where it was prefilled teaches this instance's predictor directly; one decoded on
another instance comes back from there as a `LengthLabel`. The probe (`serve --predictor probe`)
learns on the served model's hidden state at the prompt's last token, which the engine keeps on the
request from the step that samples its first token (`EngineConfig.capture_prompt_hidden`). Its
prediction is made when the prefill is done, and placement, right after, waits for it (the prior's
forward and the head: ~1 ms on a CPU core with the shipped prior); the default predictor's runs
beside the prefill instead. The state is kept here, under the request id, until the label comes
back: at most `MAX_KEPT_STATES`, the oldest evicted (a label that comes later is counted, not learned).
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future

import numpy as np

from tetriinfer.cluster import messages as msg

MAX_KEPT_STATES = 4096  # prompt hidden states awaiting their label (~16 KB each at hidden size 4096)


class PromptStates:
    """Hidden states of requests predicted here, by request id, the newest `capacity` kept."""

    def __init__(self, capacity: int = MAX_KEPT_STATES) -> None:
        self.capacity = capacity
        self._states: OrderedDict[str, np.ndarray] = OrderedDict()

    def put(self, request_id: str, state: np.ndarray) -> None:
        self._states[request_id] = state
        self._states.move_to_end(request_id)
        if len(self._states) > self.capacity:
            self._states.popitem(last=False)

    def pop(self, request_id: str) -> np.ndarray | None:
        return self._states.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._states)


class LengthLabels:
    """The predictor's side of `Instance` (its state lives there: predictor, label_to, prompt_states)."""

    def _predict(self, req) -> Future:
        """Predict a prefilled request's decode length; the probe reads its hidden state, kept for its label."""
        if req.prompt_hidden is None:
            return self.predictor.submit([req.prompt_token_ids])
        self.prompt_states.put(req.request_id, req.prompt_hidden)
        return self.predictor.submit([req.prompt_token_ids], hidden=[req.prompt_hidden])

    def _label(self, req) -> None:
        """A finished request's true length goes to the predictor that predicted it: this instance's
        (prefilled here), or that of the prefill instance its KV came from. Aborts teach nothing."""
        src = self.label_to.pop(req.request_id, None)
        self.prompt_states.pop(req.request_id)  # prefilled and decoded here: the request has it
        if req.status.value == "abort":
            return
        if src is not None and src != self.instance_id:
            self._send_to(src, msg.LengthLabel(req.request_id, req.prompt_token_ids, len(req.output_token_ids)))
        elif self.predictor is not None:
            self.predictor.observe(req.prompt_token_ids, len(req.output_token_ids), hidden=req.prompt_hidden)

    def _on_length_label(self, label: msg.LengthLabel) -> None:
        if self.predictor is not None:
            self.predictor.observe(label.prompt_token_ids, label.output_len,
                                   hidden=self.prompt_states.pop(label.request_id))
