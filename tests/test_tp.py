"""Tensor parallelism on the CPU: 2 ranks (this process and one gloo worker) against 1, on
Hugging Face random models of each family."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from hf_models import build_hf_model
from tetriinfer import LLM, SamplingParams
from tetriinfer.config import CacheConfig, EngineConfig
from tetriinfer.engine.engine import LLMEngine
from tetriinfer.model.parallel import TensorParallelError

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
SMALL = dict(chunk_size=16, num_blocks=32, block_size=16)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in (1, 9, 21)]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for family in ("llama", "qwen2", "opt", "phi3", "qwen2-moe"):
        dirs[family] = tmp_path_factory.mktemp(family)
        build_hf_model(family, dirs[family])
    return dirs


def greedy_tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts(), sampling_params=GREEDY)]


# phi3: fused checkpoint tensors split per rank; qwen2-moe: every expert's features and the shared expert's
@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "phi3", "qwen2-moe"])
def test_two_ranks_give_the_greedy_tokens_of_one(model_dirs, family):
    path = str(model_dirs[family])
    expected = greedy_tokens(LLM(path, **SMALL))
    llm = LLM(path, tensor_parallel_size=2, **SMALL)
    try:
        assert llm.engine.runner.kv_caches[0][0].shape[2] * 2 == llm.engine.arch.num_kv_heads
        assert greedy_tokens(llm) == expected
    finally:
        llm.engine.close()


def test_async_scheduling_feeds_the_worker_the_sampled_tokens(model_dirs):
    """Decode inputs sampled on rank 0 and not yet read back reach the worker by broadcast."""
    path = str(model_dirs["llama"])
    expected = greedy_tokens(LLM(path, **SMALL))
    llm = LLM(path, tensor_parallel_size=2, async_scheduling=True, **SMALL)
    try:
        assert greedy_tokens(llm) == expected
    finally:
        llm.engine.close()


def run_to_prefilled(engine: LLMEngine, rid: str, ids: list[int]) -> None:
    engine.add_request(rid, prompt_token_ids=ids, sampling=GREEDY, prefill_only=True)
    while engine.requests[rid].status.value != "prefilled":
        engine.step()


def finish(engine: LLMEngine) -> list[int]:
    out = []
    while engine.has_unfinished_requests():
        out = [o.outputs[0].token_ids for o in engine.step() if o.finished] or out
    return out[0]


@pytest.mark.parametrize("decode_tp", [2, 1])
def test_kv_moves_from_a_tp2_engine_to_a_tp2_or_tp1_engine(model_dirs, decode_tp):
    """Exported KV holds every rank's heads in rank order (the TP 1 layout), so the importing
    engine splits it by its own size."""
    path = str(model_dirs["llama"])
    ids = prompts()[2]
    whole = LLM(path, **SMALL).generate(prompt_token_ids=[ids], sampling_params=GREEDY)[0].outputs[0].token_ids
    cfg = lambda tp: EngineConfig(model=path, tensor_parallel_size=tp)  # noqa: E731
    prefill, decode = LLMEngine(cfg(2)), LLMEngine(cfg(decode_tp))
    try:
        run_to_prefilled(prefill, "r", ids)
        kv = prefill.export_request("r")
        assert kv.k.shape[2] == prefill.arch.num_kv_heads
        decode.import_request(kv)
        assert finish(decode) == whole
    finally:
        prefill.close()
        decode.close()


def test_a_tp2_decode_engine_holding_the_prefix_receives_only_the_suffix(model_dirs):
    """Prefix caching across the hand-off (issue 14) under TP: the suffix is gathered from the
    prefill engine's rank shards and scattered into the decode engine's, after its cached blocks."""
    path = str(model_dirs["llama"])
    ids = prompts()[2]  # 21 tokens
    cfg = EngineConfig(model=path, tensor_parallel_size=2, cache=CacheConfig(16, 32))
    prefill, decode = LLMEngine(cfg), LLMEngine(cfg)
    try:
        run_to_prefilled(prefill, "t1", ids)
        decode.import_request(prefill.export_request("t1"))
        turn2 = ids + finish(decode) + [7] * 10  # decode computed 26 tokens: one full block cached
        run_to_prefilled(prefill, "t2", turn2)
        res = decode.reserve_kv(prefill.parked_kv("t2").num_cached_tokens, prefill.kv_block_keys("t2"))
        kv = prefill.export_request("t2", res.skip_tokens)
        assert res.skip_tokens == 16 and kv.k.shape[1] == len(turn2) - 16
        assert kv.k.shape[2] == prefill.arch.num_kv_heads
        decode.import_request(kv, res.block_ids)
        got = finish(decode)
        whole = LLM(path, **SMALL).generate(prompt_token_ids=[turn2], sampling_params=GREEDY)[0].outputs[0].token_ids
        assert got == whole
        bm = decode.block_manager
        bm.check()
        assert bm.num_used_blocks == 0
    finally:
        prefill.close()
        decode.close()


def test_two_ranks_keep_the_prompt_hidden_state_of_one(model_dirs):
    """Rank 0's final hidden state is the whole one (replicated by the last all-reduce)."""
    path = str(model_dirs["llama"])
    ids = prompts()[2]
    states = []
    for tp in (1, 2):
        engine = LLMEngine(EngineConfig.from_flat(path, tensor_parallel_size=tp, capture_prompt_hidden=True, **SMALL))
        try:
            req = engine.add_request("r", prompt_token_ids=ids, sampling=GREEDY)
            finish(engine)
            states.append(req.prompt_hidden)
        finally:
            engine.close()
    assert states[0].shape == (engine.arch.hidden_size,)
    assert states[1] == pytest.approx(states[0], abs=1e-4)


def test_a_dead_worker_is_a_clear_error_and_close_leaves_no_process(model_dirs):
    llm = LLM(str(model_dirs["llama"]), tensor_parallel_size=2, **SMALL)
    procs = llm.engine.workers.procs
    os.kill(procs[0].pid, signal.SIGKILL)
    with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) exited with code -9"):
        greedy_tokens(llm)
    assert not any(p.is_alive() for p in procs)


def test_closing_the_engine_stops_its_workers(model_dirs):
    llm = LLM(str(model_dirs["opt"]), tensor_parallel_size=2, **SMALL)
    procs = llm.engine.workers.procs
    assert all(p.is_alive() for p in procs)
    llm.engine.close()
    assert not any(p.is_alive() for p in procs)


def test_a_size_that_does_not_divide_the_heads_is_refused_before_any_process_starts(model_dirs):
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the model's 4 attention heads"):
        LLM(str(model_dirs["llama"]), tensor_parallel_size=3, **SMALL)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_two_gpus_give_the_greedy_tokens_of_one(model_dirs):
    """The multi-GPU run: `pytest tests/test_tp.py -k gpus` on a machine with 2+ GPUs."""
    for family in ("llama", "opt"):
        path = str(model_dirs[family])
        expected = greedy_tokens(LLM(path, device="cuda:0", **SMALL))
        for extra in ({}, {"dtype": "bfloat16", "quantization": "fp8"}):
            ref = expected if not extra else greedy_tokens(LLM(path, device="cuda:0", **SMALL, **extra))
            llm = LLM(path, device="cuda:0", tensor_parallel_size=2, **SMALL, **extra)
            try:
                tokens = greedy_tokens(llm)
                if not extra:  # float32: exact; FP8 quantizes row-parallel shards apart, so near
                    assert tokens == ref
                else:
                    same = sum(a == b for x, y in zip(tokens, ref) for a, b in zip(x, y))
                    assert same >= 0.5 * sum(map(len, ref))
            finally:
                llm.engine.close()
