"""Sampling features through the engine on the tiny model: prompt logprobs (chunked prefill, prefix
cache on), top-N logprobs, stop_token_ids stripped from the text, penalties changing greedy output,
structured JSON output, and the new fields surviving a KV export/import."""

from __future__ import annotations

import json
import re

import msgspec
import pytest

from tetriinfer import LLM, SamplingParams
from tetriinfer.cluster import messages as msg

PROMPT = "The quick brown fox jumps"


@pytest.fixture(scope="module")
def llm():
    # chunk_size 8: the prompt's logprobs come from several chunks
    return LLM("tiny", chunk_size=8, num_blocks=64, enable_prefix_caching=True)


def forced_logprob(llm: LLM, prefix: list[int], token: int) -> float:
    """Reference: the raw logprob of `token` after `prefix`, read as the chosen token's logprob of a
    one-token greedy request whose bias forces that token (logprobs are read before the bias)."""
    out = llm.generate(prompt_token_ids=[prefix], sampling_params=SamplingParams(
        max_tokens=1, temperature=0, logprobs=0, ignore_eos=True, logit_bias={token: 100.0}))[0]
    assert out.outputs[0].token_ids == [token]
    return out.outputs[0].logprobs[0]


def test_prompt_logprobs_match_a_token_by_token_reference(llm):
    ids = llm.engine.tokenizer.encode(PROMPT)
    for _ in range(2):  # the second run would find the prompt in the prefix cache: still all computed
        out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
            max_tokens=1, temperature=0, prompt_logprobs=3))[0]
        assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
        assert out.prompt_top_logprobs[0] == [] and all(len(t) == 3 for t in out.prompt_top_logprobs[1:])
    for k in (1, 7, 8, 9, len(ids) - 1):  # across the chunk boundaries
        assert out.prompt_logprobs[k] == pytest.approx(forced_logprob(llm, ids[:k], ids[k]), abs=1e-4)
        best = out.prompt_top_logprobs[k][0]
        assert best[1] >= out.prompt_logprobs[k] - 1e-6


def test_no_prompt_logprobs_unless_asked(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0))[0]
    assert out.prompt_logprobs is None and out.outputs[0].logprobs is None and out.outputs[0].top_logprobs is None


def test_top_logprobs_hold_the_chosen_greedy_token(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0, logprobs=5, ignore_eos=True))[0].outputs[0]
    assert len(out.top_logprobs) == 4
    for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert len(top) == 5 and top[0][0] == token and top[0][1] == pytest.approx(lp, abs=1e-5)
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


def test_stop_token_text_is_stripped(llm):
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].outputs[0]
    stop = greedy.token_ids[3]
    first = greedy.token_ids.index(stop)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                stop_token_ids=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == greedy.token_ids[:first + 1]  # the token is still counted
    assert out.text == llm.engine.tokenizer.decode(greedy.token_ids[:first])


def test_include_stop_str_in_output_keeps_the_stop_string(llm):
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0]
    stop = greedy.text[4:6]
    assert len(stop) == 2
    cut = greedy.text.index(stop)
    for include, text in ((False, greedy.text[:cut]), (True, greedy.text[:cut + 2])):
        out = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop],
                                                    include_stop_str_in_output=include))[0].outputs[0]
        assert (out.text, out.finish_reason, out.stop_reason) == (text, "stop", stop)


def test_penalties_break_greedy_repetition(llm):
    plain = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(set(plain.token_ids)) < 12  # the random tiny model repeats itself
    out = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                presence_penalty=2.0, frequency_penalty=2.0,
                                                repetition_penalty=100.0))[0].outputs[0]
    assert len(set(out.token_ids)) == 12


def test_json_object_output_parses():
    pytest.importorskip("xgrammar")
    llm = LLM("tiny", chunk_size=16, num_blocks=64)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    for seed in range(3):
        out = llm.generate([PROMPT], SamplingParams(max_tokens=60, temperature=0.7, seed=seed,
                                                    json_schema=json.dumps(schema)))[0].outputs[0]
        assert out.finish_reason == "stop", out.text
        value = json.loads(out.text)
        assert set(value) == {"n", "ok"} and isinstance(value["n"], int) and isinstance(value["ok"], bool)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=80, temperature=0, json_object=True))[0].outputs[0]
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    else:  # cut by max_tokens: still a JSON object's prefix
        assert out.text.startswith("{")


def test_regex_and_choice_outputs_match():
    pytest.importorskip("xgrammar")
    from tetriinfer.engine.structured import choice_regex

    llm = LLM("tiny", chunk_size=16, num_blocks=64)
    for seed in range(3):
        out = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0.9, seed=seed,
                                                    regex="[0-9]{3}-[a-z]{2}"))[0].outputs[0]
        assert out.finish_reason == "stop" and re.fullmatch("[0-9]{3}-[a-z]{2}", out.text), out.text
    choices = ["yes", "no (maybe)", "a.b*c"]
    seen = set()
    for seed in range(6):
        out = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=1.0, seed=seed,
                                                    regex=choice_regex(choices)))[0].outputs[0]
        assert out.text in choices, out.text
        seen.add(out.text)
    assert len(seen) > 1
    with pytest.raises(ValueError, match="exclusive"):
        SamplingParams(regex="a", json_object=True)
    grammar = 'root ::= "yes" | "no" | "maybe"'
    outs = {llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=1.0, seed=seed, grammar=grammar))[0]
            .outputs[0].text for seed in range(4)}
    assert outs <= {"yes", "no", "maybe"}, outs
    with pytest.raises(ValueError, match="unsupported grammar"):
        llm.generate([PROMPT], SamplingParams(max_tokens=4, grammar="root ::= ("))
    with pytest.raises(ValueError, match="unsupported regex"):
        llm.generate([PROMPT], SamplingParams(max_tokens=4, regex="([a-z"))
    with pytest.raises(ValueError, match="unsupported JSON schema"):
        llm.generate([PROMPT], SamplingParams(max_tokens=4, json_schema='{"type": "no-such-type"}'))
    assert llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0))[0].outputs[0].token_ids  # still serves


def test_new_fields_survive_the_wire():
    sp = SamplingParams(max_tokens=3, logprobs=4, prompt_logprobs=2, presence_penalty=0.5, frequency_penalty=-0.5,
                        repetition_penalty=1.1, logit_bias={5: -3.0, 17: 2.5}, json_schema='{"type": "object"}',
                        allowed_token_ids=[3, 9], bad_words=["no", " not this"])
    frame = msg.encode(msg.Submit("r", [1, 2], sp))
    assert msg.decode(frame).sampling == sp
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(SamplingParams(logprobs=True)), type=SamplingParams).logprobs == 0


def test_penalised_request_continues_after_kv_import():
    """Penalties on the decode side see the output tokens made on the prefill side."""
    from tetriinfer.config import CacheConfig, EngineConfig, EngineSchedulerConfig
    from tetriinfer.engine.engine import LLMEngine

    def engine():
        return LLMEngine(EngineConfig(model="tiny", cache=CacheConfig(num_blocks=64),
                                      scheduler=EngineSchedulerConfig(chunk_size=16)))

    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, frequency_penalty=2.0, repetition_penalty=3.0,
                        logprobs=2)
    whole = engine()
    whole.add_request("a", prompt=PROMPT, sampling=sp)
    while whole.has_unfinished_requests():
        done = [o for o in whole.step() if o.finished]
    prefill, decode = engine(), engine()
    prefill.add_request("a", prompt=PROMPT, sampling=sp, prefill_only=True)
    while prefill.requests["a"].status.value != "prefilled":
        prefill.step()
    decode.import_request(prefill.export_request("a"))
    while decode.has_unfinished_requests():
        moved = [o for o in decode.step() if o.finished]
    assert moved[0].outputs[0].token_ids == done[0].outputs[0].token_ids
    assert moved[0].outputs[0].top_logprobs[0] == []  # made (and streamed) on the prefill side
    for got, want in zip(moved[0].outputs[0].top_logprobs[1:], done[0].outputs[0].top_logprobs[1:]):
        assert [t for t, _ in got] == [t for t, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-5)


def test_structured_output_starts_after_the_reasoning_end_token():
    """With `structured_after_token_id` (the `</think>` of a reasoning model) the tokens up to it are
    free, the same as an unconstrained request's, and what follows matches the constraint."""
    pytest.importorskip("xgrammar")
    llm = LLM("tiny", chunk_size=16, num_blocks=64)
    free = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # a token first seen at k plays `</think>`
    out = llm.generate([PROMPT], SamplingParams(max_tokens=40, temperature=0, regex="[0-9]{3}-[a-z]{2}",
                                                structured_after_token_id=free[k]))[0].outputs[0]
    assert out.token_ids[:k + 1] == free[:k + 1]
    assert out.finish_reason == "stop" and re.fullmatch(
        "[0-9]{3}-[a-z]{2}", bytes(t for t in out.token_ids[k + 1:] if t < 256).decode())  # < 256: not the EOS
    never = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, regex="[0-9]{3}",
                                                  structured_after_token_id=100_000))[0].outputs[0]
    assert never.token_ids == free  # the end of thinking never came: nothing was constrained
