"""FP8 KV cache (kv_cache_dtype='fp8', per-tensor scale 1.0) on the torch reference attention:
accuracy against a float32 cache, twice the tokens per byte, half the bytes moved."""

from __future__ import annotations

import pytest
import torch

from test_fp8 import all_logits, llama_dir, prompts  # noqa: F401  (the fixture)
from tetriinfer import LLM, SamplingParams
from tetriinfer.config import EngineConfig
from tetriinfer.engine.engine import LLMEngine
from tetriinfer.kernels.attention_ref import store_kv

# Promised on the test_fp8 Llama, teacher forced over 160 positions (measured: agreement 0.969,
# logits error 0.032; FP8 weights for scale: 0.906 and 0.090).
MIN_GREEDY_AGREEMENT = 0.9
MAX_LOGITS_ERROR = 0.06
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_an_fp8_cache_saturates_instead_of_storing_nan():
    k = torch.tensor([[[1000.0, -1000.0, 1.5, 0.0]]])
    cache = torch.zeros(1, 2, 1, 4, dtype=torch.float8_e4m3fn)
    store_kv(k, k, cache, cache.clone(), torch.tensor([1]))
    assert cache[0, 1, 0].float().tolist() == [448.0, -448.0, 1.5, 0.0]


def test_fp8_kv_keeps_greedy_agreement_and_logits_close_to_a_float32_cache(llama_dir):  # noqa: F811
    kwargs = dict(chunk_size=64, num_blocks=32, enable_prefix_caching=False)
    ref = all_logits(LLM(str(llama_dir), **kwargs), prompts())
    llm = LLM(str(llama_dir), kv_cache_dtype="fp8", **kwargs)
    assert llm.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    fp8 = all_logits(llm, prompts())
    agreement = (ref.argmax(-1) == fp8.argmax(-1)).float().mean().item()
    error = ((fp8 - ref).abs().max() / ref.abs().max()).item()
    assert agreement >= MIN_GREEDY_AGREEMENT, agreement
    assert 0 < error <= MAX_LOGITS_ERROR, error


def test_an_fp8_cache_holds_twice_the_tokens_of_a_bf16_one_in_the_same_memory(llama_dir):  # noqa: F811
    blocks = {kv: LLM(str(llama_dir), dtype="bfloat16", memory_fraction=0.0005, kv_cache_dtype=kv)
              .engine.block_manager.num_blocks for kv in ("auto", "fp8")}
    assert abs(blocks["fp8"] - 2 * blocks["auto"]) <= 1


def test_exported_fp8_kv_is_half_the_bytes_and_decodes_on(llama_dir):  # noqa: F811
    ids = prompts(1, 20)[0]
    whole = LLM(str(llama_dir), kv_cache_dtype="fp8", num_blocks=16).generate(
        prompt_token_ids=[ids], sampling_params=GREEDY)[0].outputs[0].token_ids
    exported = {}
    for kv_dtype, dtype in (("auto", "bfloat16"), ("fp8", "float32")):
        cfg = EngineConfig(model=str(llama_dir), dtype=dtype, kv_cache_dtype=kv_dtype)
        cfg.cache.num_blocks = 16
        prefill = LLMEngine(cfg)
        prefill.add_request("r", prompt_token_ids=ids, sampling=GREEDY, prefill_only=True)
        while prefill.requests["r"].status.value != "prefilled":
            prefill.step()
        exported[kv_dtype] = prefill.export_request("r")
    assert exported["fp8"].nbytes * 2 == exported["auto"].nbytes
    cfg = EngineConfig(model=str(llama_dir), kv_cache_dtype="fp8")
    cfg.cache.num_blocks = 16
    decode = LLMEngine(cfg)
    decode.import_request(exported["fp8"])
    out = []
    while decode.has_unfinished_requests():
        out += [o.outputs[0].token_ids for o in decode.step() if o.finished]
    assert out == [whole]


def test_fp8_kv_on_the_triton_backend_matches_the_torch_backend(llama_dir):  # noqa: F811
    """The Triton kernels (under TRITON_INTERPRET=1 on the CPU, compiled on a GPU) write and read the
    same FP8 cache as the torch reference: same greedy tokens, logits within float32 rounding of the
    attention (TF32 dots on a GPU: a looser bound)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled Triton reads GPU tensors only
    kwargs = dict(chunk_size=64, num_blocks=32, enable_prefix_caching=False, kv_cache_dtype="fp8", device=device)
    logits, tokens = {}, {}
    for backend in ("torch", "triton"):
        llm = LLM(str(llama_dir), attention_backend=backend, **kwargs)
        assert llm.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
        logits[backend] = all_logits(llm, prompts(2, 40))
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts(2, 20),
                                                                         sampling_params=GREEDY)]
    assert tokens["triton"] == tokens["torch"]
    error = ((logits["triton"] - logits["torch"]).abs().max() / logits["torch"].abs().max()).item()
    assert error <= (1e-2 if device == "cuda" else 1e-3), error


def test_kv_imported_into_an_fp8_cache_saturates_too(llama_dir):  # noqa: F811
    cfg = EngineConfig(model=str(llama_dir), dtype="bfloat16")
    cfg.cache.num_blocks = 8
    prefill = LLMEngine(cfg)
    prefill.add_request("r", prompt_token_ids=prompts(1, 20)[0], sampling=GREEDY, prefill_only=True)
    while prefill.requests["r"].status.value != "prefilled":
        prefill.step()
    kv = prefill.export_request("r")
    kv.k = kv.k * 1e4  # far past e4m3's +-448
    fp8_cfg = EngineConfig(model=str(llama_dir), kv_cache_dtype="fp8")
    fp8_cfg.cache.num_blocks = 8
    decode = LLMEngine(fp8_cfg)
    req = decode.import_request(kv)
    k_cache = decode.runner.kv_caches[0][0].float()
    assert not k_cache.isnan().any() and k_cache.abs().max() == 448
    assert req.block_ids
