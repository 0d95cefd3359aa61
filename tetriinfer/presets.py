"""Model presets: Hugging Face style config dicts of real model shapes.

The engine builds them with random weights (`load_format="dummy"`) for benchmarking; the simulator
reads the same shapes for its cost models. Plain data: importing this module needs no torch.
"""

from __future__ import annotations

import copy

# The embedded default: Llama-shaped (GQA, RMSNorm, SwiGLU, RoPE), byte-level vocabulary
# (256 bytes + <bos> <eos> <pad>, rounded up), small enough to run fast on a CPU.
TINY = {
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 258,
}

LLAMA3_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

LLAMA3_70B = {
    **LLAMA3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}

QWEN2_5_7B = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

OPT_13B = {
    "model_type": "opt",
    "vocab_size": 50272,
    "hidden_size": 5120,
    "ffn_dim": 20480,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "max_position_embeddings": 2048,
    "word_embed_proj_dim": 5120,
    "do_layer_norm_before": True,
    "activation_function": "relu",
    "enable_bias": True,
    "layer_norm_elementwise_affine": True,
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

PRESETS: dict[str, dict] = {
    "tiny": TINY,
    "llama3-8b": LLAMA3_8B,
    "llama3-70b": LLAMA3_70B,
    "qwen2.5-7b": QWEN2_5_7B,
    "opt-13b": OPT_13B,
}


# Shown beside a preset's name where presets are listed (--help, README): what it needs to run.
PRESET_NOTES = {
    "tiny": "the default, runs anywhere",
    "llama3-70b": "140 GB in bfloat16: --tensor-parallel-size 2+ or --quantization fp8 on H200s",
}


def preset_help() -> str:
    """Every preset, with its note: 'tiny (the default, ...), llama3-8b, ...'."""
    return ", ".join(f"{name} ({PRESET_NOTES[name]})" if name in PRESET_NOTES else name for name in PRESETS)


def get_preset(name: str) -> dict:
    """A fresh copy of the named preset's config dict."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
