"""Llama-family decoder: Llama 2/3, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k norm), and their
mixture-of-experts forms, Mixtral and Qwen2/Qwen3-MoE (model.moe, in the layers the config names).

Parameter names follow the Hugging Face checkpoints, except that q/k/v and gate/up are fused into
one matrix each (`qkv_proj`, `gate_up_proj`); `STACKED_PARAMS` tells the loader where the pieces go.
Under tensor parallelism (`tp`) each rank holds its heads and MLP features (see model.parallel).
"""

from __future__ import annotations

import torch
from torch import nn

from tetriinfer.model.arch import ModelArch
from tetriinfer.model.layers import ForwardContext, RMSNorm, RotaryEmbedding
from tetriinfer.model.moe import SparseMoeBlock
from tetriinfer.model.parallel import SINGLE, Linear, TensorParallel

# checkpoint name piece -> (our fused name piece, shard key)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, rotary: RotaryEmbedding, tp: TensorParallel = SINGLE):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = arch.head_dim
        self.scale = arch.head_dim**-0.5 if arch.attention_multiplier is None else arch.attention_multiplier
        # This rank's heads; a KV head stays with the query heads it serves.
        self.q_size = tp.split(arch.num_heads, "attention heads") * arch.head_dim
        self.kv_size = tp.split(arch.num_kv_heads, "KV heads") * arch.head_dim
        self.qkv_proj = Linear(arch.hidden_size, (self.q_size + 2 * self.kv_size) * tp.size, arch.qkv_bias,
                               tp, "column")
        self.o_proj = Linear(self.q_size * tp.size, arch.hidden_size, arch.o_bias, tp, "row")
        self.qk_norm = arch.qk_norm
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.norm_eps)
        self.rotary = rotary
        # The FP8 KV cache's per-tensor scales, from the checkpoint (model.loader); Python floats, so
        # CUDA graphs capture them as constants. The same on every tensor-parallel rank.
        self.k_scale = self.v_scale = 1.0

    def shard_offsets(self) -> dict:
        return {"q": (0, self.q_size), "k": (self.q_size, self.kv_size), "v": (self.q_size + self.kv_size, self.kv_size)}

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        heads = lambda t: t.unflatten(-1, (-1, self.head_dim))  # noqa: E731  [T, n * d] -> [T, n, d]
        q, k, v = (heads(t) for t in self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1))
        if self.qk_norm:
            q = self.q_norm(q.flatten(0, 1), ctx).view_as(q)
            k = self.k_norm(k.flatten(0, 1), ctx).view_as(k)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        kv_scales = ctx.kv_scales(self.layer_idx, self.k_scale, self.v_scale)
        q = ctx.kernels.rope_store_kv(q, k, v, positions, self.rotary.cos, self.rotary.sin,
                                      k_cache, v_cache, ctx.slot_mapping, **kv_scales)
        return self.o_proj(ctx.attend(self.layer_idx, q, self.scale, **kv_scales))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, tp: TensorParallel = SINGLE, intermediate_size: int | None = None):
        super().__init__()
        features = intermediate_size or arch.intermediate_size  # an expert's, in a MoE layer
        self.intermediate_size = tp.split(features, "MLP features")
        self.gate_up_proj = Linear(arch.hidden_size, 2 * features, arch.mlp_bias, tp, "column")
        self.down_proj = Linear(features, arch.hidden_size, arch.mlp_bias, tp, "row")

    def shard_offsets(self) -> dict:
        n = self.intermediate_size
        return {0: (0, n), 1: (n, n)}

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.down_proj(ctx.kernels.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block. The residual stream travels beside the hidden state so each norm also does
    the residual add (one fused kernel): h + attn and h + mlp are summed inside the next norm."""

    def __init__(self, arch: ModelArch, layer_idx: int, rotary: RotaryEmbedding, tp: TensorParallel = SINGLE):
        super().__init__()
        self.self_attn = LlamaAttention(arch, layer_idx, rotary, tp)
        self.mlp = SparseMoeBlock(arch, tp) if layer_idx in arch.sparse_layers else LlamaMLP(arch, tp)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps)
        self.residual_multiplier = arch.residual_multiplier  # Granite's; 1.0 elsewhere

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, h = h, self.input_layernorm(h, ctx)
        else:
            h, residual = self.input_layernorm(h, ctx, residual)
        h = self.self_attn(positions, h, ctx)
        if self.residual_multiplier != 1.0:
            h = h * self.residual_multiplier
        h, residual = self.post_attention_layernorm(h, ctx, residual)
        h = self.mlp(h, ctx)
        if self.residual_multiplier != 1.0:
            h = h * self.residual_multiplier
        return h, residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, tp: TensorParallel = SINGLE):
        super().__init__()
        rotary = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling)
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, i, rotary, tp) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.norm_eps)
        self.embedding_multiplier = arch.embedding_multiplier  # Granite's; 1.0 elsewhere

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        if self.embedding_multiplier != 1.0:
            h = h * self.embedding_multiplier
        for layer in self.layers:
            h, residual = layer(positions, h, residual, ctx)
        return self.norm(h, ctx, residual)[0]


class LlamaForCausalLM(nn.Module):
    stacked_params = STACKED_PARAMS

    def __init__(self, arch: ModelArch, tp: TensorParallel = SINGLE):
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch, tp)
        # Only rank 0 samples, so only rank 0 needs the LM head.
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False) if tp.rank == 0 else None
        if arch.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Final hidden states of every token, [num_tokens, hidden_size]."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        return logits if self.arch.logits_scaling == 1.0 else logits / self.arch.logits_scaling
