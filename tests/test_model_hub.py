"""Hub model ids (`ORG/NAME`) resolve through huggingface_hub's cache: tested against a cache folder
built here (models--org--name/snapshots/<rev>, refs/main), never the network."""

from __future__ import annotations

import json
import sys

import pytest

from tetriinfer.model.hub import is_hub_id, resolve_hub_model
from tetriinfer.presets import get_preset

pytest.importorskip("huggingface_hub")

REPO = "tetri-test/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An HF cache holding REPO (the tiny preset's config, no weights), with the network shut:
    HF_ENDPOINT points at a closed port, so a download attempt fails at once."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(get_preset("tiny")))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return snapshot


def test_hub_ids_are_told_apart_from_paths_and_presets():
    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct")
    assert is_hub_id("meta-llama/Llama-3.1-8B")
    for name in ("tiny", "./org/name", "/abs/dir", "a/b/c", "../x", "org/..", "~/models"):
        assert not is_hub_id(name), name


def test_a_cached_hub_id_resolves_to_its_snapshot_without_the_network(hub_cache):
    assert resolve_hub_model(REPO) == hub_cache


def test_the_loader_and_llm_take_a_cached_hub_id(hub_cache):
    from tetriinfer import LLM, SamplingParams
    from tetriinfer.model.loader import load_arch_and_tokenizer, resolve_model

    config, model_dir = resolve_model(REPO)
    assert model_dir == hub_cache and config["hidden_size"] == get_preset("tiny")["hidden_size"]
    arch, tokenizer = load_arch_and_tokenizer(REPO)
    assert arch.vocab_size == 320 and tokenizer is None  # no tokenizer.json in this snapshot
    llm = LLM(model=REPO, load_format="dummy", num_blocks=16)
    out = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_tokens=3, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 3


def test_offline_a_missing_hub_id_fails_naming_it_and_the_fix(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_hub_model(REPO) == hub_cache  # the cache still serves offline
    with pytest.raises(FileNotFoundError) as e:
        resolve_hub_model("tetri-test/not-cached")
    message = str(e.value)
    assert "tetri-test/not-cached" in message and "HF_HUB_OFFLINE" in message and "hf download" in message


def test_online_a_download_that_fails_names_the_id_and_the_cause(hub_cache):
    with pytest.raises(FileNotFoundError) as e:
        resolve_hub_model("tetri-test/not-cached")
    assert "tetri-test/not-cached" in str(e.value) and "could not be downloaded" in str(e.value)


def test_the_cli_reports_a_missing_hub_model_as_an_error_not_a_traceback(hub_cache, monkeypatch, capsys):
    from tetriinfer.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "tetri-test/not-cached", "--prompt", "hi"])
    assert e.value.code == 2 and "tetri-test/not-cached" in capsys.readouterr().err


def test_without_huggingface_hub_a_hub_id_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(FileNotFoundError, match="pip install huggingface_hub"):
        resolve_hub_model(REPO)
