"""The routes vLLM users script against outside /v1: /tokenize, /detokenize, /version, /ping, /load."""

from __future__ import annotations

import pytest

from api_utils import API_KEY, CHAT, MODEL, app, backend, call  # noqa: F401 (fixtures)
from tetriinfer.cluster.messages import ClusterStats
from tetriinfer.server.app import create_app
from test_server_api import _instance


def test_tokenize_counts_a_prompt_as_completions_encode_it(app, backend):
    prompt = "hello, tokens"
    got = call(app, "POST", "/tokenize", json={"model": MODEL, "prompt": prompt}).json()
    assert got["tokens"] == backend.tokenizer.encode(prompt)
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == backend.max_model_len
    bare = call(app, "POST", "/tokenize", json={"prompt": prompt, "add_special_tokens": False,
                                                "return_token_strs": True}).json()
    assert bare["tokens"] == backend.tokenizer.encode(prompt, add_special_tokens=False) != got["tokens"]
    assert "".join(bare["token_strs"]) == prompt
    completion = call(app, "POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 1}).json()
    assert completion["usage"]["prompt_tokens"] == got["count"]


def test_tokenize_counts_chat_messages_as_chat_completions_do(app):
    got = call(app, "POST", "/tokenize", json={"messages": CHAT}).json()
    chat = call(app, "POST", "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1}).json()
    assert got["count"] == chat["usage"]["prompt_tokens"] > 0
    no_prompt = call(app, "POST", "/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert no_prompt["count"] < got["count"]


def test_detokenize_inverts_tokenize(app):
    text = "round trip: ünïcode ✓"
    tokens = call(app, "POST", "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert call(app, "POST", "/detokenize", json={"model": MODEL, "tokens": tokens}).json() == {"prompt": text}


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": CHAT}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"model": "other", "prompt": "a"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 100000]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
    ("/detokenize", {}, 400, "tokens"),
])
def test_bad_tokenize_input_gets_a_4xx_naming_the_field(app, path, body, status, param):
    response = call(app, "POST", path, json=body)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param


def test_version_ping_and_load(app, backend):
    from tetriinfer import __version__

    assert call(app, "GET", "/version").json() == {"version": __version__}
    assert call(app, "GET", "/ping").status_code == call(app, "POST", "/ping").status_code == 200
    assert call(app, "GET", "/load").json() == {"server_load": 0, "num_requests_running": 0, "num_requests_waiting": 0}
    backend.stats = ClusterStats(instances=[_instance(0, "prefill", 10), _instance(1, "decode", 60)], num_flips=0,
                                 last_flip_s=None, dead_instances=[])
    load = call(app, "GET", "/load").json()
    assert (load["num_requests_running"], load["num_requests_waiting"]) == (3 + 3, (2 + 1) * 2)
    backend.is_healthy = False
    assert call(app, "GET", "/ping").status_code == call(app, "GET", "/health").status_code == 503


def test_the_api_key_guards_v1_only_as_in_vllm(backend):
    guarded = create_app(backend, api_key=API_KEY)
    assert call(guarded, "POST", "/v1/completions", json={"prompt": "a"}).status_code == 401
    assert call(guarded, "POST", "/tokenize", json={"prompt": "a"}).status_code == 200
    assert call(guarded, "GET", "/version").status_code == 200


# ---- /tokenizer_info ------------------------------------------------------------------------------
def test_tokenizer_info_is_a_404_unless_enabled_as_in_vllm(app):
    assert call(app, "GET", "/tokenizer_info").status_code == 404


def test_tokenizer_info_of_the_byte_tokenizer_has_its_class_special_tokens_and_the_chat_template(backend):
    from tetriinfer.model.tokenizer import SIMPLE_CHAT_TEMPLATE

    app = create_app(backend, enable_tokenizer_info_endpoint=True, api_key=API_KEY)  # outside /v1: no key needed
    r = call(app, "GET", "/tokenizer_info")
    assert r.status_code == 200, r.text
    assert r.json() == {"tokenizer_class": "ByteTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
                        "pad_token": "<pad>", "model_max_length": backend.max_model_len,
                        "chat_template": SIMPLE_CHAT_TEMPLATE}


def test_tokenizer_info_serves_the_tokenizer_config_as_vllm_does(backend):
    """vLLM's TokenizerInfoResponse: the config's settings, file paths left out, added tokens as their
    text; the chat template and tokenizer_class are the ones in use."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": {"content": "<s>", "lstrip": False,
                                                                          "__type": "AddedToken"},
              "eos_token": "</s>", "model_max_length": 4096, "vocab_file": "/models/x/vocab.json",
              "merges_file": "/models/x/merges.txt", "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": {"0": {"content": "<unk>", "lstrip": False, "normalized": False,
                                             "rstrip": False, "single_word": False, "special": True}},
              "chat_template": [{"name": "default", "template": "{{ messages }}"}]}
    backend.tokenizer.chat_template = "{{ messages }}"
    backend.tokenizer.config = config
    app = create_app(backend, enable_tokenizer_info_endpoint=True)
    got = call(app, "GET", "/tokenizer_info").json()
    assert got == {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "model_max_length": 4096, "clean_up_tokenization_spaces": False,
                   "added_tokens_decoder": {"0": "<unk>"}, "chat_template": "{{ messages }}",
                   "pad_token": "<pad>"}


def test_tokenizer_info_without_a_tokenizer_is_the_400_tokenize_gets(backend):
    backend.tokenizer = None
    app = create_app(backend, enable_tokenizer_info_endpoint=True)
    info, tokenize = call(app, "GET", "/tokenizer_info"), call(app, "POST", "/tokenize", json={"prompt": "a"})
    assert info.status_code == tokenize.status_code == 400
    assert info.json() == tokenize.json()
    assert "this model has no tokenizer" in info.json()["error"]["message"]
