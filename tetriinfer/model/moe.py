"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE).

A router scores the experts per token; the token's MLP output is its top-k experts' outputs weighted
by their softmax probabilities (renormalized over the k when the model says so), plus, in Qwen2-MoE,
a shared expert scaled by a sigmoid gate:

    p = softmax(x W_gate^T);  (w, i) = top_k(p);  y = sum_j w_j * expert_{i_j}(x) [+ sigmoid(x g^T) * shared(x)]

Each expert is a `LlamaMLP`, so its checkpoint names (`experts.E.gate_proj`, ...) load like a dense
layer's and tensor parallelism splits every expert's features. Two ways to run the same sum:
- few tokens (decode, and whatever a CUDA graph captures): every expert on every token, weighted by
  a dense [tokens, experts] matrix that is zero outside the top k: no host sync, graph-safe;
- more tokens (prefill chunks): each expert on the tokens routed to it.
A fused MoE kernel is not written yet: the dense path reads every expert's weights each step.
"""

from __future__ import annotations

import torch
from torch import nn

from tetriinfer.model.arch import ModelArch
from tetriinfer.model.layers import ForwardContext
from tetriinfer.model.parallel import SINGLE, TensorParallel

DENSE_MAX_TOKENS = 16  # up to here every expert runs on every token (no sync); past it, tokens are gathered


class SparseMoeBlock(nn.Module):
    def __init__(self, arch: ModelArch, tp: TensorParallel = SINGLE):
        from tetriinfer.model.llama import LlamaMLP

        super().__init__()
        self.top_k = arch.num_experts_per_tok
        self.renormalize = arch.norm_topk_prob
        self.gate = nn.Linear(arch.hidden_size, arch.num_experts, bias=False)  # replicated on every rank
        self.experts = nn.ModuleList(LlamaMLP(arch, tp, arch.moe_intermediate_size) for _ in range(arch.num_experts))
        self.shared_expert = self.shared_expert_gate = None
        if arch.shared_expert_intermediate_size:
            self.shared_expert = LlamaMLP(arch, tp, arch.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(arch.hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] in float32, expert ids [T, k]) of each token's top-k experts."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        weights, chosen = self.route(x)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing or x.shape[0] <= DENSE_MAX_TOKENS:
            dense = torch.zeros(x.shape[0], len(self.experts), dtype=torch.float32, device=x.device)
            dense.scatter_(1, chosen, weights)
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                out += (expert(x, ctx) * dense[:, e:e + 1]).to(x.dtype)
        else:
            out = torch.zeros_like(x)
            for e in chosen.unique().tolist():  # one host sync per layer
                tokens, slot = (chosen == e).nonzero(as_tuple=True)
                y = self.experts[e](x[tokens], ctx) * weights[tokens, slot, None]
                out.index_add_(0, tokens, y.to(x.dtype))
        if self.shared_expert is not None:
            out += torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x, ctx)
        return out
