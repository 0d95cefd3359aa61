"""The engine on a CUDA GPU: CUDA graphs against the eager forward, and against transformers.
Skipped on machines without a GPU (CI)."""

from __future__ import annotations

import pytest
import torch

from hf_models import build_hf_model
from tetriinfer import LLM, SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def prompts(lengths, vocab=256):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_match_eager(dtype):
    batch = prompts([1, 5, 64, 70, 130, 3, 200])  # 7 decodes replay the rung-8 graph, padded
    graphed = LLM("tiny", device="cuda", dtype=dtype, chunk_size=64, max_num_seqs=16, num_blocks=512)
    eager = LLM("tiny", device="cuda", dtype=dtype, chunk_size=64, max_num_seqs=16, num_blocks=512,
                enforce_eager=True)
    assert graphed.engine.runner.graphs and not eager.engine.runner.graphs
    a = [o.outputs[0].token_ids for o in graphed.generate(prompt_token_ids=batch, sampling_params=GREEDY)]
    b = [o.outputs[0].token_ids for o in eager.generate(prompt_token_ids=batch, sampling_params=GREEDY)]
    assert a == b


def test_gpu_engine_matches_transformers(tmp_path):
    hf = build_hf_model("llama", tmp_path)
    hf.generation_config.eos_token_id = None
    llm = LLM(str(tmp_path), device="cuda", chunk_size=64, num_blocks=256, max_num_seqs=8)
    batch = prompts([1, 17, 64, 65, 200], vocab=384)
    outs = llm.generate(prompt_token_ids=batch, sampling_params=GREEDY)
    with torch.no_grad():
        for ids, out in zip(batch, outs):
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)
            assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()


def test_prefill_graphs_of_other_chunk_sizes_match_eager():
    """The profiler captures extra chunk sizes; a chunk replayed from such a graph computes what the
    eager forward does."""
    from tetriinfer.engine.scheduler import PrefillPiece, StepPlan
    from tetriinfer.engine.request import Request

    llm = LLM("tiny", device="cuda", chunk_size=64, num_blocks=512, max_num_seqs=8)
    runner, bm = llm.engine.runner, llm.engine.block_manager
    runner.capture_prefill_graph(96)
    req = Request("x", prompts([96])[0], SamplingParams(max_tokens=1), 0.0)
    req.block_ids = bm.allocate(bm.blocks_for_tokens(96))
    plan = StepPlan(prefill=[PrefillPiece(req, 0, 96)])
    graphed = runner.execute(plan)
    graphs, runner.graphs = runner.graphs, {}
    eager = runner.execute(plan)
    runner.graphs = graphs
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mixed_step_graphs_match_eager(dtype):
    """Sarathi-style steps (decodes plus prompt pieces, any token count up to the budget) replay a
    graph padded up to the next token rung and give the eager forward's tokens."""
    batch = prompts([1, 5, 64, 70, 130, 3, 200, 31, 97])  # one step: 6 prompt tokens + 9 decodes
    kwargs = dict(device="cuda", dtype=dtype, chunk_size=64, max_num_seqs=16, num_blocks=512, step_policy="mixed")
    graphed, eager = LLM("tiny", **kwargs), LLM("tiny", enforce_eager=True, **kwargs)
    runner = graphed.engine.runner
    assert (64, 16 + 64) in runner.graphs and (8, 16 + 64) in runner.graphs  # rungs of 8 tokens
    replays = []
    original = runner._replay
    runner._replay = lambda g, inputs, *feed: (replays.append((g.num_seqs, g.num_tokens, inputs.num_tokens))
                                               or original(g, inputs, *feed))
    a = [o.outputs[0].token_ids for o in graphed.generate(prompt_token_ids=batch, sampling_params=GREEDY)]
    b = [o.outputs[0].token_ids for o in eager.generate(prompt_token_ids=batch, sampling_params=GREEDY)]
    assert a == b
    assert any(seqs == 16 + 64 and graph_tokens > real for seqs, graph_tokens, real in replays)  # padded mixed steps


@pytest.mark.parametrize("step_policy", ["chunked", "mixed"])
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_async_scheduling_matches_the_plain_loop(step_policy, enforce_eager):
    """Decode inputs fed on the device from the step in flight (graph replay and eager) give the
    plain loop's tokens and logprobs, with seeded sampling and a stop that comes by value."""
    batch = prompts([1, 5, 64, 70, 130, 3, 200, 31, 97])
    greedy = LLM("tiny", device="cuda", chunk_size=64, max_num_seqs=16, num_blocks=512, async_scheduling=False).generate(
        prompt_token_ids=batch[:1], sampling_params=GREEDY)[0].outputs[0].token_ids
    params = [SamplingParams(max_tokens=12 + i, temperature=0.7 if i % 2 else 0, seed=i, ignore_eos=True,
                             logprobs=True) for i in range(len(batch))]
    params[0] = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[greedy[6]])
    kwargs = dict(device="cuda", chunk_size=64, max_num_seqs=16, num_blocks=512, step_policy=step_policy,
                  enforce_eager=enforce_eager)
    plain = LLM("tiny", async_scheduling=False, **kwargs).generate(prompt_token_ids=batch, sampling_params=params)
    overlapped_llm = LLM("tiny", async_scheduling=True, **kwargs)
    overlapped = overlapped_llm.generate(prompt_token_ids=batch, sampling_params=params)
    assert [o.outputs[0].token_ids for o in overlapped] == [o.outputs[0].token_ids for o in plain]
    assert overlapped[0].outputs[0].finish_reason == "stop"
    for a, b in zip(overlapped[1:], plain[1:]):
        assert a.outputs[0].logprobs == pytest.approx(b.outputs[0].logprobs, abs=1e-4)
    engine = overlapped_llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_async_scheduling_is_on_by_default_on_gpus():
    assert LLM("tiny", device="cuda", num_blocks=64).engine.async_scheduling is True
    assert LLM("tiny", device="cuda", num_blocks=64, async_scheduling=False).engine.async_scheduling is False
