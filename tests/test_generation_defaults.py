"""The model's generation_config.json sampling settings are the defaults of requests that leave them
out (vLLM's --generation-config auto), on the server and offline; `vllm` turns them off."""

from __future__ import annotations

import json

import pytest

from api_utils import CHAT, call
from fake_backend import FakeBackend
from hf_models import build_hf_model
from tetriinfer import LLM, SamplingParams
from tetriinfer.config import EngineConfig, ServeConfig
from tetriinfer.entrypoints.serve import _sampling_defaults
from tetriinfer.model.loader import GENERATION_DEFAULT_KEYS, generation_defaults
from tetriinfer.server.app import create_app

QWEN_LIKE = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 9,
             "do_sample": True, "bos_token_id": 1}


def test_only_the_sampling_settings_are_read(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(QWEN_LIKE))
    assert generation_defaults(tmp_path) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                             "repetition_penalty": 1.05, "max_new_tokens": 9}
    assert generation_defaults(tmp_path / "absent") == {} and generation_defaults(None) == {}


def test_a_request_takes_the_models_defaults_for_what_it_leaves_out():
    backend = FakeBackend(max_model_len=512)
    backend.sampling_defaults = {k: v for k, v in QWEN_LIKE.items() if k in GENERATION_DEFAULT_KEYS}
    app = create_app(backend)
    assert call(app, "POST", "/v1/chat/completions", json={"messages": CHAT}).status_code == 200
    assert call(app, "POST", "/v1/chat/completions", json={"messages": CHAT, "temperature": 0, "top_k": -1,
                                                           "max_tokens": 30}).status_code == 200
    assert call(app, "POST", "/v1/completions", json={"prompt": "hi", "top_p": 1.0}).status_code == 200
    chat_default, chat_set, completion = (s.sampling for s in backend.started)
    assert (chat_default.temperature, chat_default.top_p, chat_default.top_k, chat_default.repetition_penalty,
            chat_default.max_tokens) == (0.7, 0.8, 20, 1.05, 9)  # max_new_tokens caps a chat without max_tokens
    assert (chat_set.temperature, chat_set.top_k, chat_set.top_p, chat_set.max_tokens) == (0.0, 0, 0.8, 30)
    assert (completion.temperature, completion.top_p, completion.max_tokens) == (0.7, 1.0, 16)  # OpenAI's 16 stays


def test_serve_reads_auto_a_folder_or_nothing(tmp_path, capsys):
    build_hf_model("qwen3", tmp_path / "model")
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "generation_config.json").write_text(json.dumps({"top_p": 0.5}))
    model = EngineConfig.from_flat(str(tmp_path / "model"))
    assert _sampling_defaults(ServeConfig(engine=model)) == {"temperature": 0.6}
    assert "Sampling defaults from" in capsys.readouterr().out
    assert _sampling_defaults(ServeConfig(engine=model, generation_config="vllm")) == {}
    assert _sampling_defaults(ServeConfig(engine=model, generation_config=str(tmp_path / "other"))) == {"top_p": 0.5}
    with pytest.raises(FileNotFoundError, match="no generation_config.json there"):
        _sampling_defaults(ServeConfig(engine=model, generation_config=str(tmp_path)))


def test_offline_generate_without_sampling_params_uses_the_models_defaults(tmp_path):
    build_hf_model("qwen3", tmp_path)
    greedy = LLM(str(tmp_path), num_blocks=16).generate(
        prompt_token_ids=[[5, 6, 7]], sampling_params=SamplingParams(temperature=0, max_tokens=4))[0]
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 4}))
    llm = LLM(str(tmp_path), num_blocks=16)
    assert (llm.get_default_sampling_params().temperature, llm.get_default_sampling_params().max_tokens) == (0.0, 4)
    assert llm.generate(prompt_token_ids=[[5, 6, 7]])[0].outputs[0].token_ids == greedy.outputs[0].token_ids
