"""The TRAIL-style probe: the online head on a causal LM's last prompt hidden state (tiny random Llama)."""

import numpy as np
import pytest
import torch

from tetriinfer.predictor.learner import Featured
from tetriinfer.predictor.prequential import featurize_all, run_stream, score_stream
from tetriinfer.predictor.probe import HiddenStateProbe
from tetriinfer.sched.lengths import BucketSpec

SPEC = BucketSpec(200, 6)
STYLES = [("one word", 5, 60), ("a paragraph", 220, 380), ("an essay", 620, 900)]


def _uniform_prior(prompts):
    n = len(prompts)
    return Featured(np.zeros((n, 1)), np.full((n, 6), 1 / 6), np.zeros(n))


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tetriinfer.predictor.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tiny-llama")
    bpe = train_bpe([f"USER: answer in {s} about topic {i}\n" for s, _, _ in STYLES for i in range(50)], vocab_size=300)
    bpe.add_special_tokens(["</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_probe_features_are_the_hidden_state_and_prior_outputs_pass_through(tiny_llama_dir):
    probe = HiddenStateProbe.from_pretrained(str(tiny_llama_dir), _uniform_prior)
    rows = probe(["USER: answer in one word about topic 3\n", [5, 6, 7]])  # text or token ids
    assert rows.features.shape == (2, 64)  # last token + mean, hidden size 32
    assert np.allclose(rows.probs, 1 / 6)
    again = probe(["USER: answer in one word about topic 3\n"])
    assert np.allclose(again.features[0], rows.features[0])  # deterministic (eval mode)


def test_a_random_weight_probe_learns_what_the_prompt_tokens_carry(tiny_llama_dir):
    """Random weights know nothing about answers; the words asking for length still reach the state."""
    probe = HiddenStateProbe.from_pretrained(str(tiny_llama_dir), _uniform_prior)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(STYLES), 600)
    prompts = [f"USER: answer in {STYLES[k][0]} about topic {rng.integers(50)}\n" for k in picks]
    tokens = np.array([rng.integers(STYLES[k][1], STYLES[k][2]) for k in picks])
    rows = featurize_all(probe, prompts)
    report = score_stream(run_stream(rows, tokens, SPEC, 50), tokens, SPEC, 50)
    assert report.accuracy_after > report.majority_accuracy_after + 0.2
    assert report.kendall_tau_after > 0.5


def test_the_online_predictor_given_hidden_states_learns_what_they_carry_and_serves_its_head():
    """The served-model form: no forward pass of its own, the state comes with each prompt and label.
    Lengths are a function of the state; the prior knows nothing (a constant)."""
    from tetriinfer.predictor.online import online_predictor
    from tetriinfer.predictor.serving import ConstantPredictor

    predictor = online_predictor(ConstantPredictor(SPEC, 1), None, hidden_features=True)
    rng = np.random.default_rng(0)
    correct, majority = [], []
    try:
        for _ in range(12):
            states = rng.normal(size=(40, 16)).astype(np.float32)
            tokens = np.exp(5.0 + 0.8 * states[:, 0]).astype(int) + 1
            prompts = [[7, 8, i] for i in range(40)]
            got = predictor.predict(prompts, hidden=list(states))
            correct += [p.bucket == SPEC.bucket_of(int(t)) for p, t in zip(got, tokens)]
            majority += [SPEC.bucket_of(int(t)) == 0 for t in tokens]  # the traffic's majority bucket
            for p, t, h in zip(prompts, tokens, states):
                predictor.observe(p, int(t), hidden=h)
            predictor.flush()
        stats = predictor.stats()
        assert stats.num_labels == 480 and stats.num_unpaired == 0
        assert stats.bucket_source in ("head", "regress", "recent")
        assert np.mean(correct[-160:]) > np.mean(majority[-160:]) + 0.15
        predictor.observe([1, 2], 50)  # a label whose state was not kept: counted, not learned
        predictor.flush()
        assert predictor.stats().num_unpaired == 1 and predictor.stats().num_labels == 480
        with pytest.raises(ValueError, match="hidden"):
            predictor.predict([[1, 2]])
    finally:
        predictor.close()


def test_load_predictor_probe_is_the_online_predictor_on_hidden_states():
    from tetriinfer.predictor import load_predictor
    from tetriinfer.predictor.online import OnlineLengthPredictor
    from tetriinfer.predictor.serving import reads_prompt_hidden

    assert reads_prompt_hidden("probe") and reads_prompt_hidden("probe:/some/dir")
    assert not any(reads_prompt_hidden(s) for s in (None, "static", "none", "/a/probe"))
    predictor = load_predictor("probe", online=False)  # the spec wins, as "static" does
    try:
        assert isinstance(predictor, OnlineLengthPredictor) and predictor.hidden_features
        state = np.ones(8, np.float32)
        [prediction] = predictor.submit(["Tell me about cats"], hidden=[state]).result()
        assert 0 <= prediction.bucket < predictor.buckets.num_buckets
    finally:
        predictor.close()
