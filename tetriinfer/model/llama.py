"""Llama-family decoder: Llama 2/3, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k norm).

Parameter names follow the Hugging Face checkpoints, except that q/k/v and gate/up are fused into
one matrix each (`qkv_proj`, `gate_up_proj`); `STACKED_PARAMS` tells the loader where the pieces go.
"""

from __future__ import annotations

import torch
from torch import nn

from tetriinfer.model.arch import ModelArch
from tetriinfer.model.layers import ForwardContext, PagedAttention, RMSNorm, RotaryEmbedding, silu_and_mul

# checkpoint name piece -> (our fused name piece, shard key)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim
        self.qkv_proj = nn.Linear(arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, arch.hidden_size, bias=False)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.norm_eps)
        self.qk_norm = arch.qk_norm
        self.head_dim = arch.head_dim
        self.rotary = rotary
        self.attn = PagedAttention(layer_idx, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.head_dim**-0.5)

    def shard_offsets(self) -> dict:
        return {"q": (0, self.q_size), "k": (self.q_size, self.kv_size), "v": (self.q_size + self.kv_size, self.kv_size)}

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        q, k = self.rotary(positions, q.unflatten(-1, (-1, self.head_dim)), k.unflatten(-1, (-1, self.head_dim)))
        return self.o_proj(self.attn(q, k, v, ctx))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        self.intermediate_size = arch.intermediate_size
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def shard_offsets(self) -> dict:
        n = self.intermediate_size
        return {0: (0, n), 1: (n, n)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = LlamaAttention(arch, layer_idx, rotary)
        self.mlp = LlamaMLP(arch)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = h + self.self_attn(positions, self.input_layernorm(h), ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        rotary = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling)
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, i, rotary) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(positions, h, ctx)
        return self.norm(h)


class LlamaForCausalLM(nn.Module):
    stacked_params = STACKED_PARAMS

    def __init__(self, arch: ModelArch):
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Final hidden states of every token, [num_tokens, hidden_size]."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
