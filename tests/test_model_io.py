"""Loading pieces: tokenizer.json and chat templates, block manager, dummy presets."""

from __future__ import annotations

import json
import re

import pytest

from hf_models import build_hf_model
from tetriinfer import LLM, SamplingParams
from tetriinfer.engine.block_manager import BlockManager, OutOfBlocks
from tetriinfer.model.tokenizer import ByteTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def model_dir_with_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    path = tmp_path_factory.mktemp("tok")
    build_hf_model("llama", path)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}",
    }))
    return path


def test_hf_tokenizer_and_chat_template(model_dir_with_tokenizer):
    tok = load_tokenizer(model_dir_with_tokenizer, None, None)
    ids = tok.encode("hello world")
    assert tok.decode(ids) == "hello world"
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s>[user] hi\n[assistant] "


def test_text_prompts_through_a_model_directory(model_dir_with_tokenizer):
    llm = LLM(str(model_dir_with_tokenizer), num_blocks=32, chunk_size=16)
    out = llm.generate(["the quick brown fox"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode("the quick brown fox")
    assert len(out.outputs[0].token_ids) == 5
    assert out.outputs[0].text == llm.get_tokenizer().decode(out.outputs[0].token_ids)


def test_generation_config_eos_ids_stop_generation_too(tmp_path):
    """A chat model's end-of-turn token named only in generation_config.json ends the reply."""
    build_hf_model("qwen3", tmp_path)
    prompt, free = [[5, 6, 7]], SamplingParams(max_tokens=6, temperature=0)
    first = LLM(str(tmp_path), num_blocks=16).generate(prompt_token_ids=prompt, sampling_params=free)[0].outputs[0]
    assert len(first.token_ids) == 6 and first.token_ids[2] not in first.token_ids[:2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, first.token_ids[2]]}))
    llm = LLM(str(tmp_path), num_blocks=16)
    assert llm.engine.eos_token_ids == (2, first.token_ids[2])  # config.json's own eos stays first
    stopped = llm.generate(prompt_token_ids=prompt, sampling_params=free)[0].outputs[0]
    assert stopped.token_ids == first.token_ids[:3] and stopped.finish_reason == "stop"


def test_directory_without_tokenizer_needs_token_ids(tmp_path):
    build_hf_model("qwen3", tmp_path)
    llm = LLM(str(tmp_path), num_blocks=16)
    with pytest.raises(ValueError, match="no tokenizer.json; pass prompt_token_ids"):
        llm.generate(["hello"])
    assert llm.generate(prompt_token_ids=[[5, 6]], sampling_params=SamplingParams(max_tokens=2))[0].finished


def test_byte_tokenizer_round_trip_and_simple_chat_template():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert ids[0] == 256 and tok.decode(ids) == "héllo ✓"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>\nhi\n<|assistant|>\n"


def test_block_manager_refcounts():
    bm = BlockManager(num_blocks=4, block_size=16)
    table = bm.allocate(2)
    assert bm.num_free_blocks == 2
    bm.grow(table, 40)  # 40 tokens need 3 blocks
    assert len(table) == 3 and bm.num_free_blocks == 1
    with pytest.raises(OutOfBlocks):
        bm.allocate(2)
    assert bm.num_free_blocks == 1  # a failed allocation takes nothing
    bm.free(table)
    assert table == [] and bm.num_free_blocks == 4
    with pytest.raises(ValueError, match="double free"):
        bm.free([0])


def test_real_model_presets_have_the_published_sizes():
    """The dummy presets have the real parameter counts (built on the meta device: no memory)."""
    import torch

    from tetriinfer.model.arch import ModelArch
    from tetriinfer.model.loader import model_class
    from tetriinfer.presets import get_preset

    expected = {"llama3-8b": 8.03e9, "qwen2.5-7b": 7.62e9, "opt-13b": 12.85e9}
    for name, count in expected.items():
        arch = ModelArch.from_hf_config(get_preset(name))
        with torch.device("meta"):
            model = model_class(arch)(arch)
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - count) / count < 0.01, (name, n)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma2"}, "unsupported model_type 'gemma2'"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}},
     "unsupported rope scaling 'longrope' (supported: default, linear, llama3, yarn)"),
    ({"partial_rotary_factor": 0.75}, "unsupported partial_rotary_factor 0.75"),
    ({"hidden_act": "gelu"}, "unsupported activation 'gelu'"),
])
def test_a_config_we_cannot_serve_exactly_is_refused_by_name(change, message):
    from tetriinfer.model.arch import ModelArch
    from tetriinfer.presets import get_preset

    config = {**get_preset("tiny"), "model_type": "phi3", **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelArch.from_hf_config(config)


def test_moe_configs_as_the_hub_writes_them_name_their_sparse_layers():
    from tetriinfer.model.arch import ModelArch

    base = dict(vocab_size=100, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, intermediate_size=96)
    qwen3 = ModelArch.from_hf_config({**base, "model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
                                      "moe_intermediate_size": 32, "decoder_sparse_step": 2, "mlp_only_layers": [3],
                                      "norm_topk_prob": True})
    assert qwen3.sparse_layers == (1, 5) and qwen3.num_experts == 8 and qwen3.norm_topk_prob and qwen3.qk_norm
    mixtral = ModelArch.from_hf_config({**base, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2})
    assert mixtral.sparse_layers == tuple(range(6)) and mixtral.moe_intermediate_size == 96
    qwen2 = ModelArch.from_hf_config({**base, "model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2,
                                      "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48})
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.shared_expert_intermediate_size == 48
    odd = ModelArch.from_hf_config({**base, "model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
                                    "moe_intermediate_size": 33})
    with pytest.raises(ValueError, match="33 expert features"):
        odd.check_fits(None, (2,))


def test_moe_models_capture_decode_graphs_only_where_the_eager_path_is_dense_too():
    from tetriinfer.engine.model_runner import decode_graph_batches
    from tetriinfer.model.moe import DENSE_MAX_TOKENS

    assert decode_graph_batches(256)[-1] == 256 and decode_graph_batches(100)[-1] == 128
    moe = decode_graph_batches(256, moe=True)
    assert moe[-1] == DENSE_MAX_TOKENS and moe == tuple(b for b in decode_graph_batches(256) if b <= DENSE_MAX_TOKENS)
    assert decode_graph_batches(4, moe=True) == (1, 2, 4)
