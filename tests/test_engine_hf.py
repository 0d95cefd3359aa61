"""The engine against Hugging Face transformers on the same random weights, for every family."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from hf_models import FAMILIES, build_hf_model
from tetriinfer import LLM, SamplingParams

MAX_NEW = 10


def random_prompt(length: int, seed: int, vocab: int = 384) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def prompts_for(chunk_size: int) -> list[list[int]]:
    """8 prompts from 1 token up to more than 3 chunks, with lengths at and around chunk edges."""
    lens = [1, 7, chunk_size - 1, chunk_size, chunk_size + 1, 2 * chunk_size + 3, 70, 3 * chunk_size + 5]
    return [random_prompt(n, seed=n) for n in lens]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, model dir, transformers model, HF greedy continuation of a prompt)."""
    name = request.param
    path = tmp_path_factory.mktemp(name)
    # One family is saved in several shards to exercise sharded loading.
    hf = build_hf_model(name, path, max_shard_size="100KB" if name == "llama" else None)
    gen_cfg = GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    hf.generation_config.eos_token_id = None  # the engine runs with ignore_eos; HF must not stop either
    cache: dict[tuple, list[int]] = {}

    def greedy(ids: list[int]) -> list[int]:
        if tuple(ids) not in cache:
            with torch.no_grad():
                out = hf.generate(torch.tensor([ids]), generation_config=gen_cfg)
            cache[tuple(ids)] = out[0, len(ids):].tolist()
        return cache[tuple(ids)]

    return name, path, hf, greedy


GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)


def test_sharded_checkpoint_loads(family):
    name, path, _, _ = family
    if name == "llama":
        assert len(list(path.glob("*.safetensors"))) > 1


def test_logits_match_transformers(family):
    """Prefill logits at every position (prompt spanning 5 chunks) and decode logits, float32."""
    _, path, hf, _ = family
    llm = LLM(str(path), chunk_size=16, num_blocks=64, block_size=16)
    runner = llm.engine.runner
    captured = []
    execute = runner.execute

    def capture(plan, all_logits=False):
        logits = execute(plan, all_logits=True)
        captured.append(logits)
        rows, idx = 0, []
        for piece in plan.prefill:
            rows += piece.length
            if piece.completes_prompt:
                idx.append(rows - 1)
        idx += list(range(rows, rows + len(plan.decode)))
        return logits[idx]

    runner.execute = capture
    prompt = random_prompt(70, seed=42)
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=True)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=sp)
    ours = torch.cat(captured)  # 70 prefill rows, then 4 decode rows
    full = prompt + out[0].outputs[0].token_ids[:4]
    with torch.no_grad():
        ref = hf(torch.tensor([full])).logits[0]
    assert ours.shape == ref.shape
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, f"relative logits error {rel:.2e}"
    # logprobs of the chosen tokens are those of the reference distribution
    chosen = torch.tensor(out[0].outputs[0].token_ids)
    ref_lp = torch.log_softmax(ref[len(prompt) - 1:], dim=-1)[torch.arange(5), chosen]
    assert out[0].outputs[0].logprobs == pytest.approx(ref_lp.tolist(), abs=1e-4)


@pytest.mark.parametrize("chunk_size", [16, 64, 512])
def test_greedy_batch_of_8_matches_generate(family, chunk_size):
    _, path, _, greedy = family
    prompts = prompts_for(chunk_size)
    llm = LLM(str(path), chunk_size=chunk_size, num_blocks=256, block_size=16)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [greedy(p) for p in prompts]
    assert llm.engine.block_manager.num_free_blocks == 256


@pytest.mark.parametrize("chunk_size", [16, 64, 512])
def test_greedy_batch_of_1_matches_generate(family, chunk_size):
    _, path, _, greedy = family
    llm = LLM(str(path), chunk_size=chunk_size, num_blocks=128, block_size=16)
    for ids in prompts_for(chunk_size):
        assert llm.generate(prompt_token_ids=[ids], sampling_params=GREEDY)[0].outputs[0].token_ids == greedy(ids)


def test_mixed_step_policy_matches_generate(family):
    """The chunked-colocated step (decodes plus prompt tokens in one batch) computes the same tokens."""
    _, path, _, greedy = family
    prompts = prompts_for(64)
    llm = LLM(str(path), chunk_size=64, step_policy="mixed", num_blocks=256)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [greedy(p) for p in prompts]


def test_triton_backend_gives_the_same_tokens(family):
    _, path, _, greedy = family
    prompts = prompts_for(16)  # the interpreter is slow: short prompts, few tokens
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under TRITON_INTERPRET=1
    llm = LLM(str(path), chunk_size=16, num_blocks=64, attention_backend="triton", device=device)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == [greedy(p)[:4] for p in prompts]
