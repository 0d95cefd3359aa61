"""OPT decoder (the paper's model): learned positions (offset 2), LayerNorm, ReLU MLP, biases everywhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tetriinfer.model.arch import ModelArch
from tetriinfer.model.layers import ForwardContext
from tetriinfer.model.parallel import SINGLE, Linear, TensorParallel

STACKED_PARAMS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
}
POSITION_OFFSET = 2  # OPT's learned position table reserves its first two rows


class OPTAttention(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.layer_idx = layer_idx
        self.local_size = tp.split(arch.num_heads, "attention heads") * arch.head_dim  # this rank's heads
        self.head_dim = arch.head_dim
        self.scale = arch.head_dim**-0.5
        self.qkv_proj = Linear(arch.hidden_size, 3 * arch.hidden_size, True, tp, "column")
        self.out_proj = Linear(arch.hidden_size, arch.hidden_size, True, tp, "row")
        self.k_scale = self.v_scale = 1.0  # the FP8 KV cache's scales, as in llama.LlamaAttention

    def shard_offsets(self) -> dict:
        n = self.local_size
        return {"q": (0, n), "k": (n, n), "v": (2 * n, n)}

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in self.qkv_proj(x).chunk(3, dim=-1))
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        kv_scales = ctx.kv_scales(self.layer_idx, self.k_scale, self.v_scale)
        ctx.kernels.store_kv(k, v, k_cache, v_cache, ctx.slot_mapping, **kv_scales)
        return self.out_proj(ctx.attend(self.layer_idx, q, self.scale, **kv_scales))


class OPTDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.pre_norm = arch.do_layer_norm_before
        self.self_attn = OPTAttention(arch, layer_idx, tp)
        self.self_attn_layer_norm = nn.LayerNorm(arch.hidden_size, eps=arch.norm_eps)
        self.fc1 = Linear(arch.hidden_size, arch.intermediate_size, True, tp, "column")
        self.fc2 = Linear(arch.intermediate_size, arch.hidden_size, True, tp, "row")
        self.final_layer_norm = nn.LayerNorm(arch.hidden_size, eps=arch.norm_eps)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.pre_norm:
            h = h + self.self_attn(self.self_attn_layer_norm(h), ctx)
            return h + self.fc2(F.relu(self.fc1(self.final_layer_norm(h))))
        h = self.self_attn_layer_norm(h + self.self_attn(h, ctx))
        return self.final_layer_norm(h + self.fc2(F.relu(self.fc1(h))))


class OPTDecoder(nn.Module):
    def __init__(self, arch: ModelArch, tp: TensorParallel = SINGLE):
        super().__init__()
        proj_dim = arch.word_embed_proj_dim or arch.hidden_size
        self.embed_tokens = nn.Embedding(arch.vocab_size, proj_dim)
        self.embed_positions = nn.Embedding(arch.max_position_embeddings + POSITION_OFFSET, arch.hidden_size)
        self.project_in = nn.Linear(proj_dim, arch.hidden_size, bias=False) if proj_dim != arch.hidden_size else None
        self.project_out = nn.Linear(arch.hidden_size, proj_dim, bias=False) if proj_dim != arch.hidden_size else None
        self.final_layer_norm = nn.LayerNorm(arch.hidden_size) if arch.do_layer_norm_before else None
        self.layers = nn.ModuleList(OPTDecoderLayer(arch, i, tp) for i in range(arch.num_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        h = h + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            h = layer(h, ctx)
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return h


class OPTModel(nn.Module):
    def __init__(self, arch: ModelArch, tp: TensorParallel = SINGLE):
        super().__init__()
        self.decoder = OPTDecoder(arch, tp)


class OPTForCausalLM(nn.Module):
    stacked_params = STACKED_PARAMS

    def __init__(self, arch: ModelArch, tp: TensorParallel = SINGLE):
        super().__init__()
        self.arch = arch
        self.model = OPTModel(arch, tp)
        # Only rank 0 samples, so only rank 0 needs the LM head.
        self.lm_head = nn.Linear(arch.word_embed_proj_dim or arch.hidden_size, arch.vocab_size, bias=False) \
            if tp.rank == 0 else None
        if arch.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
