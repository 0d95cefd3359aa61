"""vLLM's allowed_token_ids, bad_words and prompt_logprobs over the HTTP API (fake backend): they reach
SamplingParams on both endpoints, bad values are 400s with an OpenAI error naming the field before
anything runs, and prompt_logprobs come back in vLLM's shape (per completions choice; once per chat
response), alongside echo's logprobs when both are asked."""

from __future__ import annotations

import httpx
import pytest

from api_utils import CHAT, app, backend, call, live, server, sse_events  # noqa: F401 (fixtures)


def body_for(path: str, **fields) -> dict:
    return {"prompt": "abc", **fields} if path == "/v1/completions" else {"messages": CHAT, **fields}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_allowed_token_ids_and_bad_words_reach_the_sampler(app, backend, path):
    r = call(app, "POST", path, json=body_for(path, max_tokens=2, allowed_token_ids=[97, 98, 257],
                                              bad_words=["foo", " bar baz"]))
    assert r.status_code == 200, r.text
    s = backend.started[0].sampling
    assert s.allowed_token_ids == [97, 98, 257] and s.bad_words == ["foo", " bar baz"]
    assert "prompt_logprobs" not in r.json() and "prompt_logprobs" not in r.json()["choices"][0]


@pytest.mark.parametrize("path, fields, words, param", [
    ("/v1/completions", {"allowed_token_ids": [1, 259]},
     "allowed_token_ids token id 259 is outside the vocabulary [0, 259)", "allowed_token_ids"),
    ("/v1/chat/completions", {"allowed_token_ids": [-3]}, "allowed_token_ids token id -3 is negative",
     "allowed_token_ids"),
    ("/v1/completions", {"allowed_token_ids": ["7"]}, "invalid value for 'allowed_token_ids.0'", "allowed_token_ids.0"),
    ("/v1/chat/completions", {"bad_words": ["ok", ""]}, "bad_words must be non-empty strings", "bad_words"),
    ("/v1/completions", {"bad_words": "no"}, "invalid value for 'bad_words'", "bad_words"),
    ("/v1/completions", {"prompt_logprobs": 21}, "prompt_logprobs must be in [0, 20], got 21", "prompt_logprobs"),
    ("/v1/chat/completions", {"prompt_logprobs": -1}, "prompt_logprobs must be in [0, 20], got -1", "prompt_logprobs"),
    ("/v1/completions", {"prompt_logprobs": 2, "stream": True},
     "prompt_logprobs are not available when stream is true", "prompt_logprobs"),
    ("/v1/chat/completions", {"prompt_logprobs": True}, "invalid value for 'prompt_logprobs'", "prompt_logprobs"),
])
def test_a_bad_value_is_a_400_naming_the_field(app, backend, path, fields, words, param):
    r = call(app, "POST", path, json=body_for(path, **fields))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert words in error["message"] and error["param"] == param
    assert backend.started == []


def test_completions_prompt_logprobs_in_vllms_shape(app, backend):
    """The fake's prompt logprobs: -0.5 x position, each prompt token its position's likeliest, the
    next byte values 1.0 less likely each."""
    r = call(app, "POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 2, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert backend.started[0].sampling.prompt_logprobs == 2
    assert choice["text"] == "cb" and choice["logprobs"] is None  # no echo: the text is the completion's
    def entry(token: int, logprob: float, rank: int) -> dict:
        return {str(token): {"logprob": logprob, "rank": rank, "decoded_token": chr(token)}}

    assert choice["prompt_logprobs"] == [  # <bos> a b c
        None,
        {**entry(97, -0.5, 1), **entry(98, -1.5, 2)},
        {**entry(98, -1.0, 1), **entry(99, -2.0, 2)},
        {**entry(99, -1.5, 1), **entry(100, -2.5, 2)},
    ]
    assert [list(e) for e in choice["prompt_logprobs"][1:]] == [["97", "98"], ["98", "99"], ["99", "100"]]  # own first


def test_prompt_logprobs_zero_holds_the_prompt_token_alone_and_every_choice_has_them(app, backend):
    r = call(app, "POST", "/v1/completions", json={"prompt": ["ab", "xyz"], "n": 2, "max_tokens": 1,
                                                   "prompt_logprobs": 0})
    choices = r.json()["choices"]
    assert [len(c["prompt_logprobs"]) for c in choices] == [3, 3, 4, 4]
    assert choices[3]["prompt_logprobs"][1:] == [{"120": {"logprob": -0.5, "rank": 1, "decoded_token": "x"}},
                                                 {"121": {"logprob": -1.0, "rank": 1, "decoded_token": "y"}},
                                                 {"122": {"logprob": -1.5, "rank": 1, "decoded_token": "z"}}]


def test_chat_prompt_logprobs_come_once_on_the_response(app, backend):
    r = call(app, "POST", "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "n": 2,
                                                        "prompt_logprobs": 1})
    body = r.json()
    n_prompt = body["usage"]["prompt_tokens"]
    assert len(body["prompt_logprobs"]) == n_prompt and body["prompt_logprobs"][0] is None
    assert all(len(entry) == 1 and next(iter(entry.values()))["rank"] == 1 for entry in body["prompt_logprobs"][1:])
    assert all("prompt_logprobs" not in c for c in body["choices"])


def test_echo_logprobs_and_prompt_logprobs_each_keep_their_own_top_n(app, backend):
    r = call(app, "POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 1, "echo": True, "logprobs": 1,
                                                   "prompt_logprobs": 3})
    choice = r.json()["choices"][0]
    assert backend.started[0].sampling.prompt_logprobs == 3  # computed once, for the larger N
    assert choice["logprobs"]["top_logprobs"][1:4] == [{"a": -0.5}, {"b": -1.0}, {"c": -1.5}]
    assert [len(entry) for entry in choice["prompt_logprobs"][1:]] == [3, 3, 3]


def test_a_stream_accepts_prompt_logprobs_zero_and_drops_it(server):
    backend, url = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "abc", "max_tokens": 2, "stream": True,
                                                  "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and all("prompt_logprobs" not in e["choices"][0] for e in events[:-1])
    assert backend.started[0].sampling.prompt_logprobs is None
