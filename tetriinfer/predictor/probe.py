"""A TRAIL-style probe: the online head reads the served model's last prompt hidden state.

TRAIL (Shahout et al., 2024) predicts output length from the LLM's own internal state. Here the
features of `learner.OnlineLearner`'s head become a causal LM's final-layer hidden state at the
prompt's last token; the prior's bucket probabilities and score still feed the other candidates
(`majority`, `prior`, `shifted`), so the probe is only served where it beats them on recent labels.

Two sources of the state, one row layout (`probe_rows`):
- serving (`serve --predictor probe`): the served model's own state, which the engine keeps from
  the prefill it runs anyway (`EngineConfig.capture_prompt_hidden`), given to
  `OnlineLengthPredictor.predict` / `observe` as `hidden=`: no forward pass of its own;
- offline (`predictor eval --probe HF_DIR`): `HiddenStateProbe` runs a Hugging Face causal LM in the
  predictor, and appends the mean over the prompt to the last token's state.

With random weights (the tiny test models) a hidden state is a fixed random function of the prompt
tokens: the probe can then learn only what the tokens themselves carry (which words, how many),
never what a trained model "knows" about how it will answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from tetriinfer.predictor.learner import Featured

MAX_PROBE_TOKENS = 512  # the prompt's newest tokens the probe's forward pass reads


class HiddenStateProbe:
    """Featurizer: rows whose features are the causal LM's hidden state, prior outputs beside them."""

    def __init__(self, model, encode: Callable[[str], list[int]], prior_featurize: Callable,
                 max_tokens: int = MAX_PROBE_TOKENS) -> None:
        self.model = model.eval()
        self.encode = encode
        self.prior_featurize = prior_featurize
        self.max_tokens = max_tokens

    @classmethod
    def from_pretrained(cls, path: str, prior_featurize: Callable) -> "HiddenStateProbe":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        return cls(model, lambda text: tokenizer(text, add_special_tokens=True)["input_ids"], prior_featurize)

    def hidden(self, ids: Sequence[int]) -> np.ndarray:
        """[last token's final hidden state, mean over the prompt] for one prompt."""
        import torch

        ids = list(ids)[-self.max_tokens :] or [0]
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
        h = out.hidden_states[-1][0].float()
        return torch.cat([h[-1], h.mean(0)]).double().numpy()

    def __call__(self, prompts) -> Featured:
        ids = [self.encode(p) if isinstance(p, str) else p for p in prompts]
        return probe_rows(self.prior_featurize(prompts), [self.hidden(x) for x in ids])


def probe_rows(prior: Featured, hidden: Sequence[np.ndarray]) -> Featured:
    """The probe's rows: hidden states as the features, the prior's probabilities and score beside."""
    return Featured(np.stack(hidden).astype(np.float64), prior.probs, prior.score)
