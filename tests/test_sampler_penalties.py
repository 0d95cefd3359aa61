"""The sampler's logit processors (logit_bias, repetition / frequency / presence penalties) and top-N
logprobs, exact against a plain torch reference on random logits and odd vocabulary sizes, in
batches mixing requests with and without them; and seeds stay batch-independent."""

from __future__ import annotations

import random

import pytest
import torch

from tetriinfer.engine.model_runner import TokensOnDevice
from tetriinfer.engine.penalties import apply_logit_bias, apply_penalties
from tetriinfer.engine.request import Request
from tetriinfer.engine.sampler import Sampler
from tetriinfer.sampling_params import SamplingParams


def make_request(rid: str, prompt: list[int], output: list[int], **sampling) -> Request:
    return Request(rid, prompt, SamplingParams(**sampling), 0.0, output_token_ids=list(output))


def reference(logits: torch.Tensor, req: Request, extra_output: list[int] = ()) -> torch.Tensor:
    """vLLM's order, one row, plain loops: logit_bias, then repetition over prompt + output, then
    frequency and presence over output tokens."""
    row = logits.clone()
    sp = req.sampling
    for token, bias in (sp.logit_bias or {}).items():
        row[token] += bias
    output = list(req.output_token_ids) + list(extra_output)
    seen = set(req.prompt_token_ids) | set(output)
    for token in seen:
        if row[token] > 0:
            row[token] = row[token] / sp.repetition_penalty
        else:
            row[token] = row[token] * sp.repetition_penalty
    for token in set(output):
        row[token] -= sp.frequency_penalty * output.count(token) + sp.presence_penalty
    return row


def random_batch(vocab: int, rng: random.Random) -> list[Request]:
    reqs = []
    for i in range(7):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
        output = [rng.randrange(vocab) for _ in range(rng.randint(0, 15))]
        if i % 3 == 0:  # no processing at all: the row must be untouched
            reqs.append(make_request(f"r{i}", prompt, output))
            continue
        sampling = dict(repetition_penalty=rng.choice([1.0, 0.7, 1.3, 2.0]),
                        frequency_penalty=rng.choice([0.0, -1.5, 0.4, 2.0]),
                        presence_penalty=rng.choice([0.0, 1.0, -0.3]))
        if i % 2:
            sampling["logit_bias"] = {rng.randrange(vocab): rng.uniform(-100, 100) for _ in range(3)}
        reqs.append(make_request(f"r{i}", prompt, output, **sampling))
    return reqs


@pytest.mark.parametrize("vocab", [13, 101, 259])
def test_processors_match_the_torch_reference(vocab):
    rng = random.Random(vocab)
    torch.manual_seed(vocab)
    reqs = random_batch(vocab, rng)
    logits = torch.randn(len(reqs), vocab) * 4
    got = logits.clone()
    apply_logit_bias(got, reqs)
    apply_penalties(got, reqs)
    for row, req in enumerate(reqs):
        torch.testing.assert_close(got[row], reference(logits[row], req), rtol=0, atol=1e-5)
    untouched = [row for row, r in enumerate(reqs) if not r.sampling.has_penalties and not r.sampling.logit_bias]
    assert untouched and torch.equal(got[untouched], logits[untouched])


def test_a_pending_token_on_the_device_counts_as_output():
    """Async scheduling: a decode's newest token is still on the device; it is counted there."""
    rng = random.Random(5)
    vocab = 31
    reqs = [make_request(f"r{i}", [1, 2, 3], [rng.randrange(vocab) for _ in range(4)],
                         frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=1.5) for i in range(3)]
    logits = torch.randn(3, vocab)
    in_flight = torch.tensor([7, 9, 11, 30])  # the step in flight sampled these (rows of that step)
    on_device = TokensOnDevice(in_flight, decodes=[0, 2], rows=[3, 1])  # decode j takes in_flight[rows[i]]
    from tetriinfer.engine.sampler import _pending_tokens

    pending = _pending_tokens(3, on_device, 0, logits.device)
    assert pending.tolist() == [30, -1, 9]
    got = logits.clone()
    apply_penalties(got, reqs, pending)
    for row, extra in enumerate([[30], [], [9]]):
        torch.testing.assert_close(got[row], reference(logits[row], reqs[row], extra), rtol=0, atol=1e-5)


def test_greedy_rows_take_the_argmax_of_the_processed_logits():
    rng = random.Random(2)
    vocab = 57
    reqs = random_batch(vocab, rng)
    for r in reqs:
        r.sampling.temperature = 0.0
    logits = torch.randn(len(reqs), vocab)
    sampler = Sampler(torch.device("cpu"), 0, eos_token_ids=())
    got = sampler(logits.clone(), reqs).result().token_ids
    assert got == [int(reference(logits[i], r).argmax()) for i, r in enumerate(reqs)]


def test_seeded_tokens_do_not_depend_on_the_batch():
    vocab = 97
    torch.manual_seed(0)
    logits = torch.randn(6, vocab)
    seeded = make_request("s", [4, 5, 6], [4, 4, 8], seed=123, temperature=0.9, top_p=0.9,
                          repetition_penalty=1.2, frequency_penalty=0.3)
    alone = Sampler(torch.device("cpu"), 0, ()).__call__(logits[:1].clone(), [seeded]).result().token_ids[0]
    others = random_batch(vocab, random.Random(1))[:5]
    batch = Sampler(torch.device("cpu"), 99, ())(logits.clone(), [seeded, *others]).result().token_ids[0]
    assert alone == batch


def test_top_logprobs_are_those_of_the_raw_logits():
    vocab = 41
    torch.manual_seed(3)
    logits = torch.randn(3, vocab)
    reqs = [make_request("a", [1], [], logprobs=5, temperature=0, logit_bias={0: 50.0}),
            make_request("b", [1], [], logprobs=0, temperature=0),
            make_request("c", [1], [], temperature=0)]
    result = Sampler(torch.device("cpu"), 0, ())(logits.clone(), reqs).result()
    raw = torch.log_softmax(logits, dim=-1)
    assert result.token_ids[0] == 0  # the bias decides the token, not the reported logprobs
    assert result.logprobs[0] == pytest.approx(float(raw[0, 0]), abs=1e-6)
    top = raw[0].topk(5)
    assert [t for t, _ in result.top_logprobs[0]] == top.indices.tolist()
    assert [v for _, v in result.top_logprobs[0]] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert result.top_logprobs[1] == [] and result.top_logprobs[2] == []


def test_min_p_samples_only_tokens_within_min_p_of_the_likeliest_and_leaves_other_rows_alone():
    vocab, temperature, min_p = 33, 0.7, 0.2
    torch.manual_seed(4)
    logits = torch.randn(2, vocab) * 3
    probs = torch.softmax(logits[0] / temperature, dim=-1).tolist()  # plain reference: vLLM's order
    allowed = {t for t, p in enumerate(probs) if p >= min_p * max(probs)}
    assert 1 < len(allowed) < vocab
    seen = set()
    for seed in range(300):
        row = make_request("m", [1], [], temperature=temperature, min_p=min_p, seed=seed)
        plain = make_request("p", [1], [], temperature=temperature, seed=seed)
        got = Sampler(torch.device("cpu"), 0, ())(logits.clone(), [row, plain]).result().token_ids
        alone = Sampler(torch.device("cpu"), 0, ())(logits[1:].clone(), [plain]).result().token_ids[0]
        seen.add(got[0])
        assert got[1] == alone  # a min_p row in the batch changes nothing for the others
    assert seen <= allowed and len(seen) > 1
    greedy_like = make_request("g", [1], [], temperature=temperature, min_p=1.0, seed=0)
    assert Sampler(torch.device("cpu"), 0, ())(logits[:1].clone(), [greedy_like]).result().token_ids == \
        [int(logits[0].argmax())]


@pytest.mark.parametrize("bad", [dict(min_p=1.5), dict(presence_penalty=2.5), dict(frequency_penalty=-3.0),
                                 dict(repetition_penalty=0.0), dict(logit_bias={3: 101.0}),
                                 dict(logprobs=21), dict(prompt_logprobs=-1)])
def test_bad_values_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        SamplingParams(**bad)


def test_logprobs_true_means_the_chosen_token_only():
    assert SamplingParams(logprobs=True).logprobs == 0
    assert SamplingParams(logprobs=False).logprobs is None
