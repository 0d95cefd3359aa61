"""Tiny random-weight models of each family, built with transformers' own classes and saved as HF
directories, for the exactness tests."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
              initializer_range=0.2)  # larger than HF's 0.02 so greedy outputs vary, not repeat one token


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**COMMON, intermediate_size=96, num_key_value_heads=2, rms_norm_eps=1e-5,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
    return LlamaForCausalLM(cfg)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**COMMON, intermediate_size=96, num_key_value_heads=1, sliding_window=None)
    return MistralForCausalLM(cfg)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**COMMON, intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # HF initializes biases to zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=32)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.normal_(1, 0.3)
            layer.self_attn.k_norm.weight.normal_(1, 0.3)
    return model


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(**{k: v for k, v in COMMON.items()}, ffn_dim=96, word_embed_proj_dim=64, pad_token_id=0)
    model = OPTForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def _llama_biases_linear_rope():
    """Llama with `attention_bias` (q/k/v and o) and `mlp_bias`, and linear RoPE scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**COMMON, intermediate_size=96, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                      rope_scaling={"rope_type": "linear", "factor": 2.0})
    return _random_biases(LlamaForCausalLM(cfg))


def _qwen2_yarn():
    """Qwen2.5 as its model cards extend it to long context: YaRN RoPE scaling."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**COMMON, intermediate_size=96, num_key_value_heads=2,
                      rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512})
    return _random_biases(Qwen2ForCausalLM(cfg))


def _phi3():
    """Phi-3: a Llama whose checkpoint stores q/k/v and gate/up already fused."""
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(**COMMON, intermediate_size=96, num_key_value_heads=2, pad_token_id=0, sliding_window=None)
    return Phi3ForCausalLM(cfg)


def _mixtral():
    """Mixtral: every layer a sparse MoE (4 experts, top 2, renormalized)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(**COMMON, intermediate_size=96, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return _random_routers(MixtralForCausalLM(cfg))


def _qwen2_moe():
    """Qwen2-MoE: top 2 of 4 experts without renormalizing, a gated shared expert, and layer 1 dense."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(**COMMON, intermediate_size=96, num_key_value_heads=2, moe_intermediate_size=48, num_experts=4,
                         num_experts_per_tok=2, shared_expert_intermediate_size=80, mlp_only_layers=[1])
    return _random_biases(_random_routers(Qwen2MoeForCausalLM(cfg)))


def _qwen3_moe():
    """Qwen3-MoE: q/k norms, top 2 of 6 experts renormalized."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=32, moe_intermediate_size=48,
                         num_experts=6, num_experts_per_tok=2, norm_topk_prob=True)
    return _random_routers(Qwen3MoeForCausalLM(cfg))


def _granite():
    """Granite: a Llama with multipliers on the embeddings, the residual branches, the attention
    scores (in place of head_dim ** -0.5) and the logits; tied embeddings, as Granite 3 ships."""
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = GraniteConfig(**COMMON, intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True,
                        embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=0.5)
    return GraniteForCausalLM(cfg)


def _random_routers(model):
    """Router weights large enough that tokens pick different experts (some inits are zeros)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight"):
                p.normal_(0, 0.5)
    return model


def _random_biases(model):
    with torch.no_grad():  # HF initializes biases to zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    return model


FAMILIES = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "opt": _opt,
            "llama-biases": _llama_biases_linear_rope, "qwen2-yarn": _qwen2_yarn, "phi3": _phi3,
            "mixtral": _mixtral, "qwen2-moe": _qwen2_moe, "qwen3-moe": _qwen3_moe, "granite": _granite}
SEEDS = {family: i for i, family in enumerate(("llama", "mistral", "opt", "qwen2", "qwen3", "llama-biases", "qwen2-yarn",
                                                "phi3", "mixtral", "qwen2-moe", "qwen3-moe", "granite"))}


def build_hf_model(family: str, out_dir: Path, max_shard_size: str | None = None):
    """Build, save (safetensors) and return the transformers model, in float32 eval mode."""
    torch.manual_seed(SEEDS[family])
    model = FAMILIES[family]().float().eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    return model
