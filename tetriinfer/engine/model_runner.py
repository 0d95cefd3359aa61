"""Executes a StepPlan: builds the batch tensors, runs the model, returns the logits to sample from.

It owns the KV cache tensors (one K and one V tensor per layer, [num_blocks, block_size, kv_heads,
head_dim]) and the per-request KV export/import; it never decides what to run.
"""

from __future__ import annotations

import torch

from tetriinfer.engine.scheduler import StepPlan
from tetriinfer.kernels import get_attention_backend
from tetriinfer.model.arch import ModelArch
from tetriinfer.model.layers import ForwardContext


class ModelRunner:
    def __init__(self, model: torch.nn.Module, arch: ModelArch, num_blocks: int, block_size: int,
                 attention_backend: str, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.arch = arch
        self.block_size = block_size
        self.device = device
        self.attention = get_attention_backend(attention_backend)
        shape = (num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(arch.num_layers)
        ]

    @torch.inference_mode()
    def execute(self, plan: StepPlan, all_logits: bool = False) -> torch.Tensor:
        """Logits [num_sampled, vocab] of the tokens that end a prompt or are decodes, in plan order
        (prefill pieces, then decodes). With `all_logits`, logits of every real token instead."""
        input_ids, positions, slots, seq_lens, block_tables, sample_idx = [], [], [], [], [], []
        for piece in plan.prefill:
            req = piece.request
            span = range(piece.start, piece.start + piece.length)
            input_ids.extend(req.token_at(p) for p in span)
            positions.extend(span)
            slots.extend(self._slot(req.block_ids, p) for p in span)
            seq_lens.append(piece.start + piece.length)
            block_tables.append(req.block_ids)
            if piece.completes_prompt:
                sample_idx.append(len(input_ids) - 1)
        for req in plan.decode:
            pos = req.num_tokens - 1
            input_ids.append(req.token_at(pos))
            positions.append(pos)
            slots.append(self._slot(req.block_ids, pos))
            seq_lens.append(pos + 1)
            block_tables.append(req.block_ids)
            sample_idx.append(len(input_ids) - 1)
        num_real = len(input_ids)
        query_lens = [p.length for p in plan.prefill] + [1] * len(plan.decode)
        # Chunk padding: token 0 at position 0, written nowhere, attended by nobody.
        input_ids.extend([0] * plan.num_padding)
        positions.extend([0] * plan.num_padding)
        slots.extend([-1] * plan.num_padding)

        dev = self.device
        max_blocks = max(len(b) for b in block_tables)
        table = torch.zeros((len(block_tables), max_blocks), dtype=torch.int32)
        for i, blocks in enumerate(block_tables):
            table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        query_start_loc[1:] = torch.tensor(query_lens, dtype=torch.int32).cumsum(0)
        ctx = ForwardContext(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=table.to(dev),
            query_start_loc=query_start_loc.to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            kv_caches=self.kv_caches,
            attention=self.attention,
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            ctx,
        )
        selected = hidden[:num_real] if all_logits else hidden[torch.tensor(sample_idx, dtype=torch.long, device=dev)]
        return self.model.compute_logits(selected)

    def _slot(self, block_ids: list[int], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def read_kv(self, block_ids: list[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a request's first `num_tokens` tokens: [num_layers, num_tokens, kv_heads, head_dim] each."""
        slots = torch.tensor([self._slot(block_ids, p) for p in range(num_tokens)], device=self.device)
        ks = torch.stack([k.flatten(0, 1)[slots] for k, _ in self.kv_caches])
        vs = torch.stack([v.flatten(0, 1)[slots] for _, v in self.kv_caches])
        return ks, vs

    def write_kv(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        num_tokens = k.shape[1]
        slots = torch.tensor([self._slot(block_ids, p) for p in range(num_tokens)], device=self.device)
        for layer, (k_cache, v_cache) in enumerate(self.kv_caches):
            k_cache.flatten(0, 1)[slots] = k[layer].to(device=self.device, dtype=k_cache.dtype)
            v_cache.flatten(0, 1)[slots] = v[layer].to(device=self.device, dtype=v_cache.dtype)
