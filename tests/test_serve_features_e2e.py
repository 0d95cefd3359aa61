"""End to end through `tetriinfer serve` (tiny model, CPU): the sampling features survive the
cluster path (SamplingParams over msgspec, the KV hand-off from prefill to decode) and give the
offline engine's tokens: n > 1 with seeds, penalties and logit_bias, top-N and prompt logprobs
(echo, computed on the prefill side), stop_token_ids stripped, structured JSON output, vLLM's
bad_words, allowed_token_ids and prompt_logprobs."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from serve_utils import start_server
from tetriinfer import LLM, SamplingParams

ARGS = ["--num-blocks", "128", "--chunk-size", "16", "--max-model-len", "256", "--no-prefix-caching",
        "--disable-log-stats"]
PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module", params=["disagg", "single"])
def server(request, tmp_path_factory):
    # --policy paper: every request is prefilled on the prefill instance and its KV moved (no shortcut)
    shape = (["--prefill-instances", "1", "--decode-instances", "1", "--policy", "paper"]
             if request.param == "disagg"
             else ["--mode", "colocated", "--instances", "1"])
    with start_server([*shape, *ARGS], tmp_path_factory.mktemp(request.param)) as s:
        yield s


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", num_blocks=128, chunk_size=16, max_model_len=256, enable_prefix_caching=False)


def post(server, path: str, body: dict) -> dict:
    r = httpx.post(f"{server.url}{path}", json={"model": "tiny", **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def offline(llm, **sampling):
    return llm.generate([PROMPT], SamplingParams(**sampling))[0]


def test_n_seeded_choices_and_penalties_match_offline(server, llm):
    body = post(server, "/v1/completions", {"prompt": PROMPT, "n": 2, "max_tokens": 10, "seed": 5, "temperature": 1.0,
                                            "ignore_eos": True, "presence_penalty": 1.5, "frequency_penalty": 0.5,
                                            "repetition_penalty": 1.3, "logit_bias": {"101": 4.0}})
    for i, choice in enumerate(body["choices"]):
        want = offline(llm, max_tokens=10, seed=5 + i, temperature=1.0, ignore_eos=True, presence_penalty=1.5,
                       frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={101: 4.0})
        assert choice["index"] == i and choice["text"] == want.outputs[0].text
    assert body["usage"]["completion_tokens"] == 20


def test_top_and_prompt_logprobs_match_offline(server, llm):
    body = post(server, "/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 3, "max_tokens": 4,
                                            "temperature": 0, "ignore_eos": True})
    lp = body["choices"][0]["logprobs"]
    want = offline(llm, max_tokens=4, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=3)
    n_prompt = len(want.prompt_token_ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:n_prompt] == pytest.approx(want.prompt_logprobs[1:], abs=1e-4)
    assert lp["token_logprobs"][n_prompt:] == pytest.approx(want.outputs[0].logprobs, abs=1e-4)
    decode = llm.engine.tokenizer.decode
    for got, top in zip(lp["top_logprobs"][n_prompt:], want.outputs[0].top_logprobs):
        assert set(got) >= {decode([t]) for t, _ in top if decode([t])}
    assert body["choices"][0]["text"] == PROMPT + want.outputs[0].text


def test_stop_token_text_is_stripped(server, llm):
    greedy = offline(llm, max_tokens=8, temperature=0, ignore_eos=True).outputs[0]
    stop = greedy.token_ids[4]
    body = post(server, "/v1/completions",
                {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stop_token_ids": [stop]})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == llm.engine.tokenizer.decode(greedy.token_ids[:greedy.token_ids.index(stop)])


def test_json_schema_output_parses(server):
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    body = post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "a number?"}], "max_tokens": 60, "temperature": 0.5, "seed": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["message"]["content"])["answer"], int)


def test_guided_choice_and_guided_regex_constrain_a_served_request(server):
    pytest.importorskip("xgrammar")
    body = post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "yes or no?"}], "max_tokens": 10, "temperature": 1.0, "seed": 5,
        "guided_choice": ["yes", "no", "not sure"]})
    assert body["choices"][0]["message"]["content"] in ("yes", "no", "not sure")
    body = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.8, "seed": 2,
                                           "guided_regex": "[0-9]{2}:[0-9]{2}"})
    assert re.fullmatch("[0-9]{2}:[0-9]{2}", body["choices"][0]["text"]), body


def test_vllm_bad_words_allowed_ids_and_prompt_logprobs_match_offline(server, llm):
    """Across the KV hand-off (disagg): the decode side bans the word after the prefill side's
    tokens; prompt_logprobs are computed on the prefill side and come with the first token."""
    plain = offline(llm, max_tokens=16, temperature=0, ignore_eos=True).outputs[0].token_ids
    word = chr(next(t for t in plain if 33 <= t < 127))  # a token the unconstrained run outputs
    sampling = dict(max_tokens=16, temperature=0, ignore_eos=True, bad_words=[word], prompt_logprobs=2)
    want = offline(llm, **sampling)
    body = post(server, "/v1/completions", {"prompt": PROMPT, **sampling})
    choice = body["choices"][0]
    assert choice["text"] == want.outputs[0].text and word not in choice["text"]
    assert choice["prompt_logprobs"][0] is None
    for k in range(1, len(want.prompt_token_ids)):
        entry = choice["prompt_logprobs"][k]
        mine = entry[str(want.prompt_token_ids[k])]
        assert mine["logprob"] == pytest.approx(want.prompt_logprobs[k], abs=1e-4)
        assert mine["rank"] == want.prompt_ranks[k]
        assert {str(t) for t, _ in want.prompt_top_logprobs[k]} <= set(entry)
    allowed = list(range(97, 123))
    body = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                                                 "temperature": 0, "ignore_eos": True, "allowed_token_ids": allowed})
    content = body["choices"][0]["message"]["content"]
    assert len(content) == 12 and set(content) <= {chr(t) for t in allowed}
