"""The engine's prompt hidden state (EngineConfig.capture_prompt_hidden, the length probe's
features): transformers' final hidden state at the prompt's last token, kept on the request from the
step that samples its first token, and nowhere else."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from hf_models import build_hf_model
from tetriinfer.config import EngineConfig
from tetriinfer.engine.engine import LLMEngine
from tetriinfer.engine.request import RequestStatus
from tetriinfer.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return path, build_hf_model("llama", path)


def engine_for(path, capture: bool = True, **kwargs) -> LLMEngine:
    kwargs = dict(chunk_size=16, num_blocks=64, block_size=8) | kwargs
    return LLMEngine(EngineConfig.from_flat(str(path), capture_prompt_hidden=capture, **kwargs))


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_last_hidden(hf, ids: list[int]) -> np.ndarray:
    """transformers' final-norm hidden state at the last token (what its LM head reads)."""
    with torch.no_grad():
        return hf.model(torch.tensor([ids])).last_hidden_state[0, -1].numpy()


def run_all(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step_requests()


@pytest.mark.parametrize("step_policy,async_scheduling", [("chunked", False), ("mixed", True)])
def test_a_prompt_over_several_chunks_keeps_the_transformers_state_of_its_last_token(llama, step_policy,
                                                                                     async_scheduling):
    path, hf = llama
    engine = engine_for(path, step_policy=step_policy, async_scheduling=async_scheduling)
    ids = [prompt(45, 0), prompt(7, 1)]  # 3 chunks of 16, and one that completes beside it
    reqs = [engine.add_request(str(i), prompt_token_ids=p, sampling=GREEDY) for i, p in enumerate(ids)]
    run_all(engine)
    for req, p in zip(reqs, ids):
        assert req.prompt_hidden.dtype == np.float32 and req.prompt_hidden.shape == (64,)
        np.testing.assert_allclose(req.prompt_hidden, hf_last_hidden(hf, p), atol=1e-4)


def test_a_prefix_cache_hit_keeps_the_state_of_the_whole_prompt(llama):
    path, hf = llama
    engine = engine_for(path)
    shared = prompt(32, 2)
    engine.add_request("a", prompt_token_ids=shared + prompt(5, 3), sampling=GREEDY)
    run_all(engine)
    ids = shared + prompt(9, 4)
    req = engine.add_request("b", prompt_token_ids=ids, sampling=GREEDY)
    run_all(engine)
    assert req.num_cached_tokens == 32  # only the suffix was computed
    np.testing.assert_allclose(req.prompt_hidden, hf_last_hidden(hf, ids), atol=1e-4)


def test_with_capture_off_nothing_is_kept(llama):
    path, _ = llama
    engine = engine_for(path, capture=False)
    req = engine.add_request("r", prompt_token_ids=prompt(20, 5), sampling=GREEDY)
    run_all(engine)
    assert req.prompt_hidden is None and engine.runner.prompt_hidden is None


def test_a_recompute_after_preemption_keeps_the_prompt_state_not_an_output_tokens(llama):
    path, hf = llama
    engine = engine_for(path, num_blocks=7)  # two requests of 26 tokens need 8 blocks of 8: one is preempted
    ids = [prompt(20, 6), prompt(20, 7)]
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    reqs = [engine.add_request(str(i), prompt_token_ids=p, sampling=sp) for i, p in enumerate(ids)]
    run_all(engine)
    assert reqs[1].num_preemptions > 0  # prefilled again over its prompt and outputs
    for req, p in zip(reqs, ids):
        np.testing.assert_allclose(req.prompt_hidden, hf_last_hidden(hf, p), atol=1e-4)


@pytest.mark.parametrize("release", ["export", "finish", "abort"])
def test_the_state_goes_with_the_request(llama, release):
    path, _ = llama
    engine = engine_for(path)
    req = engine.add_request("r", prompt_token_ids=prompt(20, 7), sampling=GREEDY, prefill_only=release != "finish")
    while req.prompt_hidden is None:
        engine.step_requests()
    state = weakref.ref(req.prompt_hidden)
    if release == "export":
        assert req.status == RequestStatus.PREFILLED
        engine.export_request("r")
    elif release == "abort":
        engine.abort_request("r")
    else:
        run_all(engine)
    del req
    gc.collect()
    assert not engine.requests and state() is None
