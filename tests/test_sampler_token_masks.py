"""vLLM's allowed_token_ids and bad_words in the sampler: exact against plain torch / Python loops on
random logits, in batches mixing rows with and without them (those rows stay bit-identical), also
with a decode's newest token still on the device (async scheduling); how bad words are tokenized
(with and without a leading space, as vLLM does); and the checks of bad values."""

from __future__ import annotations

import random

import pytest
import torch

from tetriinfer.engine.mask_checks import bad_words_token_ids, check_token_masks
from tetriinfer.engine.model_runner import TokensOnDevice
from tetriinfer.engine.request import Request
from tetriinfer.engine.sampler import Sampler, _pending_tokens
from tetriinfer.engine.token_masks import apply_allowed_token_ids, apply_bad_words
from tetriinfer.model.tokenizer import ByteTokenizer, Tokenizer
from tetriinfer.sampling_params import SamplingParams

VOCAB = 259  # the byte tokenizer's: bytes, <bos>, <eos>, <pad>
NEG = float("-inf")


class WordTokenizer(Tokenizer):
    """Longest-match over a few pieces, where a word and its spaced form are different tokens (as
    in BPE vocabularies); anything else is one token per byte, offset by 100."""

    PIECES = {" foo": 11, "foo": 10, " bar": 13, "bar": 12, " ": 14}
    bos_token_id, eos_token_id = None, None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            piece = next((p for p in sorted(self.PIECES, key=len, reverse=True) if text.startswith(p, i)), None)
            ids.append(self.PIECES[piece] if piece else 100 + ord(text[i]))
            i += len(piece) if piece else 1
        return ids


def make_request(rid: str, output: list[int], **sampling) -> Request:
    return Request(rid, [256, 1, 2], SamplingParams(**sampling), 0.0, output_token_ids=list(output))


def reference(logits: torch.Tensor, req: Request, extra_output: list[int] = ()) -> torch.Tensor:
    """One row, plain loops: every token outside allowed_token_ids is -inf; a bad word (its bytes:
    the byte tokenizer spells a spaced word longer, so only the bare form counts) bans its last
    byte where the output so far ends with its other bytes."""
    row = logits.clone()
    allowed = req.sampling.allowed_token_ids
    if allowed:
        for token in range(len(row)):
            if token not in allowed:
                row[token] = NEG
    output = list(req.output_token_ids) + list(extra_output)
    for word in req.sampling.bad_words:
        ids = list(word.lstrip().encode())
        if len(ids) - 1 <= len(output) and (len(ids) == 1 or output[len(output) - len(ids) + 1:] == ids[:-1]):
            row[ids[-1]] = NEG
    return row


def random_batch(rng: random.Random) -> list[Request]:
    reqs = []
    for i in range(8):
        output = [rng.choice(b"abc") for _ in range(rng.randint(0, 6))]
        if i % 4 == 0:  # neither: the row must be untouched
            reqs.append(make_request(f"r{i}", output))
            continue
        sampling = {}
        if i % 2:
            sampling["allowed_token_ids"] = rng.sample(range(VOCAB), rng.randint(1, 20))
        if i % 4 != 1:
            sampling["bad_words"] = [rng.choice(["a", "ab", "cab", " bc", "abcab", "z"]) for _ in range(3)]
        reqs.append(make_request(f"r{i}", output, **sampling))
    return reqs


@pytest.mark.parametrize("seed", range(4))
def test_masks_match_the_torch_reference_and_leave_other_rows_bit_identical(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    reqs = random_batch(rng)
    logits = torch.randn(len(reqs), VOCAB) * 3
    got = logits.clone()
    apply_allowed_token_ids(got, reqs)
    apply_bad_words(got, reqs, ByteTokenizer(), None, set())
    for row, req in enumerate(reqs):
        assert torch.equal(got[row], reference(logits[row], req)), req.sampling
    untouched = [row for row, r in enumerate(reqs) if not r.sampling.allowed_token_ids and not r.sampling.bad_words]
    assert untouched and torch.equal(got[untouched], logits[untouched])


def test_a_multi_token_bad_word_is_banned_only_after_its_prefix():
    req = make_request("r", list(b"xxca"), bad_words=["cab"])
    logits = torch.zeros(1, VOCAB)
    apply_bad_words(logits, [req], ByteTokenizer(), None, set())
    assert logits[0, ord("b")] == NEG and int((logits[0] == NEG).sum()) == 1
    other = make_request("o", list(b"xxcx"), bad_words=["cab"])  # the prefix is broken: nothing banned
    logits = torch.zeros(1, VOCAB)
    apply_bad_words(logits, [other], ByteTokenizer(), None, set())
    assert not (logits == NEG).any()


def test_a_pending_token_on_the_device_completes_a_bad_words_prefix():
    """Async scheduling: the newest token is on the device; the ban hinges on it there."""
    reqs = [make_request("a", list(b"xc"), bad_words=["cab"]),   # pending 'a': 'ca' -> ban 'b'
            make_request("b", list(b"xc"), bad_words=["cab"]),   # pending 'x': nothing
            make_request("c", list(b"x"), bad_words=["ab"]),     # pending 'a': 'a' -> ban 'b'
            make_request("d", list(b"ca"), bad_words=["cab"])]   # no pending token: 'ca' -> ban 'b'
    in_flight = torch.tensor([ord("x"), ord("a"), ord("a"), 0])
    on_device = TokensOnDevice(in_flight, decodes=[0, 1, 2], rows=[1, 0, 2])
    pending = _pending_tokens(4, on_device, 0, torch.device("cpu"))
    logits = torch.randn(4, VOCAB)
    got = logits.clone()
    apply_bad_words(got, reqs, ByteTokenizer(), pending, {0, 1, 2})
    for row, extra in enumerate([[ord("a")], [ord("x")], [ord("a")], []]):
        assert torch.equal(got[row], reference(logits[row], reqs[row], extra))
    assert got[0, ord("b")] == NEG and got[1, ord("b")] != NEG and got[2, ord("b")] == NEG and got[3, ord("b")] == NEG


def test_greedy_rows_take_the_argmax_of_the_masked_logits_through_the_sampler():
    rng = random.Random(7)
    torch.manual_seed(7)
    reqs = random_batch(rng)
    for r in reqs:
        r.sampling.temperature = 0.0
    logits = torch.randn(len(reqs), VOCAB) * 3
    sampler = Sampler(torch.device("cpu"), 0, eos_token_ids=(257,), tokenizer=ByteTokenizer())
    got = sampler(logits.clone(), reqs).result().token_ids
    assert got == [int(reference(logits[i], r).argmax()) for i, r in enumerate(reqs)]
    for token, r in zip(got, reqs):
        assert not r.sampling.allowed_token_ids or token in r.sampling.allowed_token_ids


def test_sampled_tokens_stay_inside_allowed_token_ids():
    allowed = [3, 50, 51, 200]
    for seed in range(50):
        req = make_request("s", [], allowed_token_ids=allowed, temperature=1.5, seed=seed)
        token = Sampler(torch.device("cpu"), 0, ())(torch.randn(1, VOCAB), [req]).result().token_ids[0]
        assert token in allowed


def test_bad_words_are_tokenized_bare_and_with_a_leading_space_as_vllm_does():
    words = WordTokenizer()
    assert bad_words_token_ids(["foo"], words) == [[10], [11]]  # a different word token with the space
    assert bad_words_token_ids(["  foo bar"], words) == [[10, 13], [11, 13]]  # leading spaces dropped first
    assert bad_words_token_ids(["x"], words) == [[220]]  # " x" is two tokens: the space alone is not banned
    assert bad_words_token_ids(["ab", " c"], ByteTokenizer()) == [[97, 98], [99]]  # no BOS
    assert ByteTokenizer().encode("ab", add_special_tokens=False) == [97, 98]


def test_bad_ids_and_words_are_value_errors_naming_the_field():
    with pytest.raises(ValueError, match="allowed_token_ids token id -1 is negative"):
        SamplingParams(allowed_token_ids=[5, -1])
    with pytest.raises(ValueError, match="bad_words must be non-empty strings"):
        SamplingParams(bad_words=["ok", "  "])
    with pytest.raises(ValueError, match=r"allowed_token_ids token id 259 is outside the vocabulary \[0, 259\)"):
        check_token_masks(SamplingParams(allowed_token_ids=[1, 259]), VOCAB, ByteTokenizer())
    with pytest.raises(ValueError, match="bad_words 'foo' has token id 10, outside"):
        check_token_masks(SamplingParams(bad_words=["foo"]), 10, WordTokenizer())
    with pytest.raises(ValueError, match="bad_words needs the model's tokenizer"):
        check_token_masks(SamplingParams(bad_words=["a"]), VOCAB, None)
    # the no-op values: null and []
    assert SamplingParams(allowed_token_ids=[], bad_words=None).allowed_token_ids is None
    assert SamplingParams(bad_words=None).bad_words == []
