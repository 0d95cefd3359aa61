"""vLLM's allowed_token_ids, bad_words and prompt_logprobs through the engine: the tiny model's greedy
outputs hold only allowed ids and never a banned word's tokens (words taken from the unconstrained
output, so the checks can fail), with async scheduling too and after a KV export/import; and the
prompt's logprobs, ranks and top-N equal a log_softmax over transformers' logits."""

from __future__ import annotations

import pytest
import torch

from tetriinfer import LLM, SamplingParams
from tetriinfer.config import CacheConfig, EngineConfig, EngineSchedulerConfig
from tetriinfer.engine.engine import LLMEngine

GREEDY = dict(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(request):
    # async: a decode's newest token is still on the device when the masks are built
    return LLM("tiny", chunk_size=8, num_blocks=128, async_scheduling=request.param)


def greedy(llm: LLM, prompt: str, **extra) -> list[int]:
    return llm.generate([prompt], SamplingParams(**GREEDY, **extra))[0].outputs[0].token_ids


def contains(tokens: list[int], seq: list[int]) -> bool:
    return any(tokens[i:i + len(seq)] == seq for i in range(len(tokens) - len(seq) + 1))


def ascii_pair(tokens: list[int]) -> list[int]:
    """Two consecutive different printable ASCII tokens of `tokens` (a word the byte tokenizer spells so)."""
    pair = next(([a, b] for a, b in zip(tokens, tokens[1:]) if 33 <= a < 127 and 33 <= b < 127 and a != b), None)
    assert pair is not None, tokens
    return pair


def test_greedy_output_holds_only_allowed_token_ids(llm):
    plain = greedy(llm, "The quick brown fox jumps")
    allowed = [t for t in range(65, 91) if t not in plain]  # capitals the unconstrained run does not pick
    assert not set(plain) <= set(allowed)
    out = greedy(llm, "The quick brown fox jumps", allowed_token_ids=allowed)
    assert set(out) <= set(allowed)


def test_a_single_token_bad_word_is_never_output(llm):
    plain = greedy(llm, "The quick brown fox jumps")
    word = next(t for t in plain if 33 <= t < 127)
    out = greedy(llm, "The quick brown fox jumps", bad_words=[chr(word)])
    assert word in plain and word not in out


def test_a_multi_token_bad_word_never_appears_while_its_tokens_alone_may(llm):
    plain = greedy(llm, "zzzz")
    pair = ascii_pair(plain)
    out = greedy(llm, "zzzz", bad_words=[bytes(pair).decode()])
    assert contains(plain, pair) and not contains(out, pair)
    assert out[:plain.index(pair[0])] == plain[:plain.index(pair[0])]  # the same until the word would start
    assert pair[0] in out  # only the completing token is banned, after its prefix


def test_masked_requests_leave_the_rest_of_the_batch_alone(llm):
    prompts = ["The quick brown fox jumps", "zzzz", "Hello world"]
    solo = [greedy(llm, p) for p in prompts]
    masks = [{}, {"bad_words": [bytes(ascii_pair(solo[1])).decode()]}, {"allowed_token_ids": list(range(65, 91))}]
    outs = llm.generate(prompts, [SamplingParams(**GREEDY, **m) for m in masks])
    assert outs[0].outputs[0].token_ids == solo[0]
    for prompt, mask, plain, out in zip(prompts[1:], masks[1:], solo[1:], outs[1:]):
        assert out.outputs[0].token_ids == greedy(llm, prompt, **mask) != plain


def test_bad_words_still_apply_after_a_kv_import():
    """The decode side tokenizes the words again and matches the output made on the prefill side."""
    def engine():
        return LLMEngine(EngineConfig(model="tiny", cache=CacheConfig(num_blocks=64),
                                      scheduler=EngineSchedulerConfig(chunk_size=16)))

    whole = LLM("tiny", chunk_size=16, num_blocks=64)
    pair = ascii_pair(greedy(whole, "zzzz"))
    sp = SamplingParams(**GREEDY, bad_words=[bytes(pair).decode()])
    want = whole.generate(["zzzz"], sp)[0].outputs[0].token_ids
    prefill, decode = engine(), engine()
    prefill.add_request("a", prompt="zzzz", sampling=sp, prefill_only=True)
    while prefill.requests["a"].status.value != "prefilled":
        prefill.step()
    decode.import_request(prefill.export_request("a"))
    while decode.has_unfinished_requests():
        done = [o for o in decode.step() if o.finished]
    assert done[0].outputs[0].token_ids == want and not contains(want, pair)


def test_out_of_vocabulary_allowed_ids_are_a_value_error(llm):
    vocab = llm.engine.arch.vocab_size
    with pytest.raises(ValueError, match=f"allowed_token_ids token id {vocab} is outside the vocabulary"):
        llm.generate(["hi"], SamplingParams(max_tokens=2, allowed_token_ids=[1, vocab]))


def test_prompt_logprobs_ranks_and_top_n_equal_log_softmax_over_transformers_logits(tmp_path):
    from hf_models import build_hf_model

    hf = build_hf_model("llama", tmp_path)
    prompt = torch.randint(3, 384, (21,), generator=torch.Generator().manual_seed(4)).tolist()
    llm = LLM(str(tmp_path), chunk_size=8, num_blocks=64)  # the prompt spans three chunks
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        max_tokens=1, temperature=0, prompt_logprobs=5))[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None and out.prompt_ranks[0] is None and out.prompt_top_logprobs[0] == []
    for k in range(1, len(prompt)):
        row, token = ref[k - 1], prompt[k]  # position k - 1 predicts token k
        assert out.prompt_logprobs[k] == pytest.approx(float(row[token]), abs=1e-4)
        assert out.prompt_ranks[k] == int((row > row[token]).sum()) + 1
        top = row.topk(5)
        assert [t for t, _ in out.prompt_top_logprobs[k]] == top.indices.tolist()
        assert [v for _, v in out.prompt_top_logprobs[k]] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert any(rank > 5 for rank in out.prompt_ranks[1:])  # some prompt tokens fall outside the top-5
