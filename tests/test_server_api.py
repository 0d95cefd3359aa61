"""The OpenAI-compatible server over a fake backend, in-process (httpx on the ASGI app): completions,
chat, bad input, backend failures, models, health, auth and metrics. Streaming, disconnects and the
official `openai` client against a real uvicorn server: test_server_stream.py."""

from __future__ import annotations

import pytest

from api_utils import API_KEY, CHAT, MODEL, app, backend, call, expected_text, metric_value  # noqa: F401 (fixtures)
from fake_backend import FakeBackend
from tetriinfer.cluster.messages import ClusterStats, InstanceStats
from tetriinfer.sched.dispatcher import DecodeLoad
from tetriinfer.server.app import create_app

# ---- completions and chat, in-process -------------------------------------------------------------
def test_completion_text_usage_and_sampling_fields(app, backend):
    r = call(app, "POST", "/v1/completions", json={
        "model": MODEL, "prompt": "hello", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
        "seed": 3, "stop_token_ids": [7], "ignore_eos": True, "min_tokens": 2, "stop": "zz", "user": "ignored",
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    assert isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["text"] == expected_text(backend, "hello", 7) == "ollehol"
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    (started,) = backend.started
    assert started.request_id == body["id"] and started.prompt == "hello"
    assert started.prompt_token_ids == backend.tokenizer.encode("hello")
    s = started.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (7, 0.5, 0.9, 5, 3)
    assert (s.stop, s.stop_token_ids, s.ignore_eos, s.min_tokens, s.logprobs) == (["zz"], [7], True, 2, None)


def test_completion_defaults(app, backend):
    r = call(app, "POST", "/v1/completions", json={"prompt": "abc"})  # model may be left out
    assert r.status_code == 200, r.text
    nulls = dict.fromkeys(["model", "max_tokens", "temperature", "top_p", "stop", "n", "stream", "ignore_eos",
                           "min_tokens", "logprobs", "echo", "seed"])
    r2 = call(app, "POST", "/v1/completions", json={"prompt": "abc", **nulls})  # null is "unset"
    assert r2.status_code == 200, r2.text
    assert (r2.json()["choices"], r2.json()["usage"]) == (r.json()["choices"], r.json()["usage"])
    assert backend.started[1].sampling == backend.started[0].sampling
    s = backend.started[0].sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (16, 1.0, 1.0, 0, None)
    assert r.json()["usage"]["completion_tokens"] == 16


def test_completion_token_id_prompts_and_single_item_lists(app, backend):
    for prompt in ([104, 105], [[104, 105]]):
        r = call(app, "POST", "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "ihi"
        assert backend.started[-1].prompt_token_ids == [104, 105] and backend.started[-1].prompt is None
    r = call(app, "POST", "/v1/completions", json={"model": MODEL, "prompt": ["hey"], "max_tokens": 3})
    assert r.json()["choices"][0]["text"] == "yeh"


def test_completion_stop_string_finishes_with_stop(app):
    r = call(app, "POST", "/v1/completions", json={"prompt": "abcdef", "max_tokens": 10, "stop": ["d", "q"]})
    choice = r.json()["choices"][0]
    assert choice["text"] == "fe" and choice["finish_reason"] == "stop" and choice["stop_reason"] == "d"


def test_completion_logprobs_of_chosen_tokens(app, backend):
    r = call(app, "POST", "/v1/completions", json={"prompt": "hello", "max_tokens": 3, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["o", "l", "l"]
    assert lp["token_logprobs"] == [-0.25, -0.5, -0.75]
    assert lp["text_offset"] == [0, 1, 2]
    # the fake's top-2: the chosen byte, then the next one 1.0 less likely
    assert lp["top_logprobs"] == [{"o": -0.25, "p": -1.25}, {"l": -0.5, "m": -1.5}, {"l": -0.75, "m": -1.75}]
    assert backend.started[0].sampling.logprobs == 2 and backend.started[0].sampling.prompt_logprobs is None


def test_chat_uses_the_chat_template_and_text_parts(app, backend):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]
    r = call(app, "POST", "/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    expected_prompt = backend.tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi\nthere"}])
    started = backend.started[0]
    assert started.prompt == expected_prompt
    assert started.prompt_token_ids == backend.tokenizer.encode(expected_prompt)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected_text(backend, expected_prompt, 4)}
    assert choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(started.prompt_token_ids)
    assert body["usage"]["completion_tokens"] == 4


def test_chat_max_completion_tokens_default_and_logprobs(app, backend):
    msgs = [{"role": "user", "content": "hi"}]
    r = call(app, "POST", "/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 2, "logprobs": True})
    lp = r.json()["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in lp] == [-0.25, -0.5]
    assert all(e["bytes"] == list(e["token"].encode()) and e["top_logprobs"] == [] for e in lp)
    # Without a limit, a chat request may fill the context (as vLLM does).
    call(app, "POST", "/v1/chat/completions", json={"messages": msgs})
    started = backend.started[-1]
    assert started.sampling.max_tokens == backend.max_model_len - len(started.prompt_token_ids)


# ---- bad input ------------------------------------------------------------------------------------
LONG = "x" * 200  # > max_model_len (128) byte tokens

BAD_REQUESTS = [
    # (path, body, status, param, words in the message)
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "temperature"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", "stream"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "prompt must be"),
    ("/v1/completions", {}, 400, "prompt", "prompt is required"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop", "stop must be"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": ["a"]}, 400, "stop_token_ids.0", "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "stream_options": 3}, 400, "stream_options", "stream_options"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages.0.role", "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content",
     "content must be"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content", "only"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "non-empty"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model", "gpt-4"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": CHAT}, 404, "model", "does not exist"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "prompt is empty"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "prompt is empty"),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 1}, 400, "prompt", "maximum context length is 128"),
    ("/v1/completions", {"prompt": "x" * 100, "max_tokens": 50}, 400, "max_tokens", "151 tokens (101 in the prompt, 50"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages",
     "maximum context length is 128"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "max_tokens must be"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": -1}, 400, "max_tokens", ">= 1"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.1}, 400, "temperature", "temperature must be >= 0"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "hi", "top_k": -3}, 400, "top_k", "top_k"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens", "min_tokens"),
    ("/v1/completions", {"prompt": [1, 259]}, 400, "prompt", "token id 259 is outside the vocabulary [0, 259)"),
    ("/v1/completions", {"prompt": [-1, 5]}, 400, "prompt", "token id -1"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [300]}, 400, "stop_token_ids", "300"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "prompt is empty"),
    ("/v1/completions", {"prompt": ["a", [1]]}, 400, "prompt", "prompt must be a string"),
    ("/v1/completions", {"prompt": [[1, 2], [3, "x"]]}, 400, "prompt", "prompt must be a string"),
    ("/v1/completions", {"prompt": ["a", ""]}, 400, "prompt", "prompt is empty"),
    ("/v1/completions", {"prompt": [[1, 2], [300]]}, 400, "prompt", "token id 300"),
    ("/v1/completions", {"prompt": ["a", "b"], "n": 65}, 400, "prompt", "exceed 128"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", "n must be in [1, 128]"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, 400, "best_of", "not supported"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, 400, "logprobs", "logprobs must be >= 0"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", "at most 20"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty", "[-2, 2]"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty", "[-2, 2]"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty", "> 0"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias", "token ids"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"300": 1}}, 400, "logit_bias", "outside the vocabulary"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"3": 101}}, 400, "logit_bias", "[-100, 100]"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "only be set when stream"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", "needs logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs",
     "[0, 20]"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "xml"}}, 400, "response_format",
     "not supported"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_schema"}}, 400,
     "response_format", "json_schema"),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD_REQUESTS,
                         ids=[f"{i}-{b[0].split('/')[-1]}-{b[3]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_openai_error(app, backend, path, body, status, param, words):
    r = call(app, "POST", path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"
    assert backend.started == []  # nothing reached the backend


@pytest.mark.parametrize("content, words", [(b"{not json", "malformed JSON"), (b"[1, 2]", "JSON object"),
                                            (b"", "malformed JSON")])
def test_malformed_body(app, content, words):
    r = call(app, "POST", "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert words in r.json()["error"]["message"]


def test_unknown_route_and_method_keep_the_error_shape(app):
    r = call(app, "GET", "/v1/nothing")
    assert r.status_code == 404 and "message" in r.json()["error"]
    r = call(app, "GET", "/v1/completions")
    assert r.status_code == 405 and "message" in r.json()["error"]


# ---- backend failures, in-process ----------------------------------------------------------------
@pytest.mark.parametrize("fail_with, message", [("error", "fake backend failure"), ("abort", "request aborted"),
                                                ("raise", "fake backend failure")])
def test_backend_failure_is_a_500(app, backend, fail_with, message):
    backend.fail_after, backend.fail_with = 2, fail_with
    r = call(app, "POST", "/v1/completions", json={"prompt": "hello", "max_tokens": 5})
    assert r.status_code == 500
    assert r.json()["error"] == {"message": message, "type": "server_error", "param": None, "code": None}
    # An exception leaves the request's fate unknown on the backend: it must be aborted there.
    assert backend.aborted == ([backend.started[0].request_id] if fail_with == "raise" else [])


# ---- other routes, auth, metrics ---------------------------------------------------------------
def test_models_and_health(app, backend):
    data = call(app, "GET", "/v1/models").json()["data"]
    assert [m["id"] for m in data] == [MODEL] and data[0]["object"] == "model"
    assert call(app, "GET", f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert call(app, "GET", "/v1/models/other").status_code == 404
    r = call(app, "GET", "/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    backend.is_healthy = False
    assert call(app, "GET", "/health").status_code == 503


def test_api_key(backend):
    app = create_app(backend, api_key=API_KEY)
    good = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": API_KEY}):
        for method, path, kwargs in (("POST", "/v1/completions", {"json": body}), ("GET", "/v1/models", {}),
                                     ("POST", "/v1/chat/completions", {"json": {"messages": CHAT}})):
            r = call(app, method, path, headers=headers, **kwargs)
            assert r.status_code == 401, (headers, path)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert backend.started == []
    assert call(app, "POST", "/v1/completions", json=body, headers=good).status_code == 200
    assert call(app, "GET", "/v1/models", headers=good).status_code == 200
    assert call(app, "GET", "/health").status_code == 200
    assert call(app, "GET", "/metrics").status_code == 200


def _instance(instance_id: int, role: str, used: int) -> InstanceStats:
    return InstanceStats(instance_id=instance_id, role=role, address=f"ipc://{instance_id}", pid=1000 + instance_id, draining=role == "decode",
                         load_fraction=0.5, queued_prompt_tokens=100 * instance_id, num_waiting=2, num_running=3,
                         num_dispatch_waiting=1, kv_blocks_total=64, kv_blocks_used=used,
                         decode_load=DecodeLoad(instance_id, 10, 1, 2, free_slots=3), kv_transfer_bytes=4096,
                         kv_transfer_seconds=0.5, kv_transfers=7, kv_transfer_failures=1)


def test_metrics_requests_latencies_and_cluster_view(app, backend):
    text = call(app, "GET", "/metrics").text
    assert metric_value(text, "tetriinfer_requests_running") == 0
    assert "tetriinfer_kv_blocks_used" not in text  # no cluster report yet
    call(app, "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    call(app, "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True})
    call(app, "POST", "/v1/completions", json={"prompt": ""})
    backend.fail_after = 0
    call(app, "POST", "/v1/completions", json={"prompt": "hi"})
    backend.stats = ClusterStats(instances=[_instance(0, "prefill", 10), _instance(1, "decode", 60)], num_flips=3,
                                 last_flip_s=0.006, dead_instances=[5])
    text = call(app, "GET", "/metrics").text
    assert metric_value(text, 'tetriinfer_requests_total{outcome="ok"}') == 2
    assert metric_value(text, 'tetriinfer_requests_total{outcome="rejected"}') == 1
    assert metric_value(text, 'tetriinfer_requests_total{outcome="error"}') == 1
    assert metric_value(text, 'tetriinfer_requests_total{outcome="aborted"}') == 0
    for name in ("ttft_seconds", "tpot_seconds", "jct_seconds", "prompt_tokens", "output_tokens"):
        assert metric_value(text, f"tetriinfer_{name}_count") == 2
    assert metric_value(text, "tetriinfer_output_tokens_sum") == 6
    assert metric_value(text, 'tetriinfer_kv_blocks_used{instance="1",role="decode"}') == 60
    assert metric_value(text, 'tetriinfer_kv_blocks_free{instance="1",role="decode"}') == 4
    assert metric_value(text, 'tetriinfer_queued_prompt_tokens{instance="1",role="decode"}') == 100
    assert metric_value(text, 'tetriinfer_num_waiting{instance="0",role="prefill"}') == 2
    assert metric_value(text, 'tetriinfer_num_running{instance="0",role="prefill"}') == 3
    assert metric_value(text, 'tetriinfer_draining{instance="1",role="decode"}') == 1
    assert metric_value(text, 'tetriinfer_draining{instance="0",role="prefill"}') == 0
    assert metric_value(text, 'tetriinfer_kv_transfer_bytes_total{instance="0",role="prefill"}') == 4096
    assert metric_value(text, 'tetriinfer_kv_transfer_seconds_total{instance="0",role="prefill"}') == 0.5
    assert metric_value(text, 'tetriinfer_kv_transfers_total{instance="0",role="prefill"}') == 7
    assert metric_value(text, 'tetriinfer_kv_transfer_failures_total{instance="0",role="prefill"}') == 1
    assert metric_value(text, 'tetriinfer_instance_info{instance="1",pid="1001",role="decode"}') == 1
    assert "ipc://" not in text  # no inbox address is published
    assert metric_value(text, "tetriinfer_instances") == 2
    assert metric_value(text, "tetriinfer_flips_total") == 3
    assert metric_value(text, "tetriinfer_last_flip_seconds") == 0.006
    assert metric_value(text, "tetriinfer_dead_instances") == 1


def test_metrics_also_answer_under_vllm_names_so_its_dashboards_work(app, backend):
    for stream in (False, True):
        call(app, "POST", "/v1/completions", json={"prompt": "hi there", "max_tokens": 3, "stream": stream})
    instances = [_instance(0, "prefill", 10), _instance(1, "decode", 60)]
    instances[1].prefix_queried_tokens, instances[1].prefix_hit_tokens = 400, 96
    backend.stats = ClusterStats(instances=instances, num_flips=0, last_flip_s=None, dead_instances=[])
    text = call(app, "GET", "/metrics").text
    label = '{model_name="fake-model"}'
    assert metric_value(text, f"vllm:num_requests_running{label}") == 3 + 3
    assert metric_value(text, f"vllm:num_requests_waiting{label}") == (2 + 1) * 2  # queued + waiting for a decode
    assert metric_value(text, f"vllm:kv_cache_usage_perc{label}") == (10 + 60) / 128
    assert metric_value(text, f"vllm:prefix_cache_queries_total{label}") == 400
    assert metric_value(text, f"vllm:prefix_cache_hits_total{label}") == 96
    for ours, vllm in (("ttft_seconds", "time_to_first_token_seconds"), ("tpot_seconds", "time_per_output_token_seconds"),
                       ("jct_seconds", "e2e_request_latency_seconds"), ("prompt_tokens", "request_prompt_tokens"),
                       ("output_tokens", "request_generation_tokens")):
        for part in ("count", "sum"):  # one observation, two names
            assert metric_value(text, f"vllm:{vllm}_{part}{label}") == metric_value(text, f"tetriinfer_{ours}_{part}")
    assert metric_value(text, f"vllm:request_success_total{label}") == 2
    assert metric_value(text, f"vllm:generation_tokens_total{label}") == 6
    assert metric_value(text, f"vllm:prompt_tokens_total{label}") == metric_value(text, "tetriinfer_prompt_tokens_sum") > 0


def test_two_apps_in_one_process_have_their_own_metrics(backend):
    a, b = create_app(backend), create_app(FakeBackend())
    call(a, "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert metric_value(call(a, "GET", "/metrics").text, 'tetriinfer_requests_total{outcome="ok"}') == 1
    assert metric_value(call(b, "GET", "/metrics").text, 'tetriinfer_requests_total{outcome="ok"}') == 0
