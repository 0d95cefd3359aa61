"""vLLM's allowed_token_ids, bad_words, prompt_logprobs and truncate_prompt_tokens over the HTTP API
(fake backend): they reach SamplingParams (or the prompt's token ids) on both endpoints, bad values
are 400s with an OpenAI error naming the field before anything runs, prompt_logprobs come back in
vLLM's shape (per completions choice; once per chat response), alongside echo's logprobs when both
are asked, and a truncated prompt is what every choice, the usage and echo see."""

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


# ---- truncate_prompt_tokens -----------------------------------------------------------------------
def test_truncate_prompt_tokens_keeps_the_last_k_tokens_of_a_text_prompt_and_echo_shows_them(app, backend):
    prompt = "hello world"
    full = backend.tokenizer.encode(prompt)  # <bos> h e l l o ...
    r = call(app, "POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 0,
                                                   "truncate_prompt_tokens": 4})
    assert r.status_code == 200, r.text
    assert backend.started[0].prompt_token_ids == full[-4:] == list(b"orld")
    body = r.json()
    assert body["usage"]["prompt_tokens"] == 4
    choice = body["choices"][0]
    # echo: the kept prompt, then the fake's answer to it (the kept bytes reversed)
    assert choice["text"] == "orld" + "dlr"
    assert choice["logprobs"]["tokens"] == ["o", "r", "l", "d", "d", "l", "r"]
    assert choice["logprobs"]["token_logprobs"][:4] == [None, -0.5, -1.0, -1.5]  # the kept prompt's own


def test_truncate_prompt_tokens_applies_to_every_token_id_prompt_of_a_batch_and_every_choice(app, backend):
    prompts = [list(range(97, 107)), [120, 121]]
    r = call(app, "POST", "/v1/completions", json={"prompt": prompts, "n": 2, "max_tokens": 1,
                                                   "truncate_prompt_tokens": 3, "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    assert [s.prompt_token_ids for s in backend.started] == [[104, 105, 106]] * 2 + [[120, 121]] * 2
    body = r.json()
    assert body["usage"]["prompt_tokens"] == 3 + 2  # each prompt once, as kept
    assert [len(c["prompt_logprobs"]) for c in body["choices"]] == [3, 3, 2, 2]


def test_a_prompt_no_longer_than_truncate_prompt_tokens_is_unchanged(app, backend):
    r = call(app, "POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 1, "echo": True,
                                                   "truncate_prompt_tokens": 4})
    assert backend.started[0].prompt_token_ids == backend.tokenizer.encode("abc")
    assert backend.started[0].prompt == "abc"
    assert r.json()["usage"]["prompt_tokens"] == 4 and r.json()["choices"][0]["text"] == "abcc"


def test_chat_truncate_prompt_tokens_keeps_the_last_k_tokens_after_the_chat_template(app, backend):
    templated = call(app, "POST", "/tokenize", json={"messages": CHAT}).json()["tokens"]
    assert len(templated) > 5
    r = call(app, "POST", "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "prompt_logprobs": 0,
                                                        "truncate_prompt_tokens": 5})
    assert r.status_code == 200, r.text
    assert backend.started[0].prompt_token_ids == templated[-5:]
    body = r.json()
    assert body["usage"]["prompt_tokens"] == 5 and len(body["prompt_logprobs"]) == 5


def test_chat_without_max_tokens_fills_the_context_left_by_the_truncated_prompt(app, backend):
    r = call(app, "POST", "/v1/chat/completions", json={"messages": CHAT, "truncate_prompt_tokens": 5})
    assert r.status_code == 200, r.text
    assert backend.started[0].sampling.max_tokens == backend.max_model_len - 5


def test_truncate_prompt_tokens_minus_one_cuts_a_prompt_to_the_models_context(app, backend):
    long = list(range(200))  # 200 token ids, over the fake's 128-token context
    assert call(app, "POST", "/v1/completions", json={"prompt": long, "max_tokens": 1}).status_code == 400
    r = call(app, "POST", "/v1/completions", json={"prompt": long, "max_tokens": 1, "truncate_prompt_tokens": -1})
    # kept: the last 128, which leaves no room for the one output token (as in vLLM)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "(128 in the prompt, 1 for the completion)" in r.json()["error"]["message"]
    ok = call(app, "POST", "/v1/completions", json={"prompt": long[:100], "max_tokens": 1, "truncate_prompt_tokens": -1})
    assert ok.json()["usage"]["prompt_tokens"] == 100 and backend.started[0].prompt_token_ids == long[:100]


def test_a_truncated_stream_echoes_the_kept_prompt(server):
    backend, url = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hello world", "max_tokens": 2, "echo": True,
                                                  "stream": True, "truncate_prompt_tokens": 3,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[0]["choices"][0]["text"] == "rld"
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "rld" + "dl"
    assert events[-2]["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("value, words", [
    (0, "truncate_prompt_tokens must be an integer >= 1 (keep the prompt's last k tokens) or -1"),
    (-2, "got -2"),
    (129, "truncate_prompt_tokens (129) cannot be greater than this model's maximum context length (128)"),
    (2.0, "invalid value for 'truncate_prompt_tokens'"),
    (True, "invalid value for 'truncate_prompt_tokens'"),
    ("4", "invalid value for 'truncate_prompt_tokens'"),
])
def test_a_bad_truncate_prompt_tokens_is_a_400_naming_it(app, backend, path, value, words):
    r = call(app, "POST", path, json=body_for(path, max_tokens=1, truncate_prompt_tokens=value))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["param"] == "truncate_prompt_tokens"
    assert backend.started == []
