"""Executes a StepPlan: builds the batch tensors, runs the model, returns the logits to sample from.

It owns the KV cache tensors (one K and one V tensor per layer, [num_blocks, block_size, kv_heads,
head_dim]) and the per-request KV export/import; it never decides what to run.

On a GPU every step is replayed from a CUDA graph, so Python launches no kernels for it:
- decode batches: captured at a ladder of batch sizes; a batch is padded up to the next rung;
- prefill chunks of exactly `chunk_size` tokens (TetriInfer's chunks all have that shape; up to
  `MAX_GRAPH_PIECES` prompt pieces per chunk);
- with `mixed_steps` (the Sarathi-style step policy), steps holding decodes and prompt pieces up to
  `chunk_size` tokens: captured at a ladder of token counts (`mixed_graph_tokens`), each with room
  for every running request plus `MAX_GRAPH_PIECES` prompt pieces; a step is padded up to its rung.
Padding sequences have no tokens and padding tokens write no KV, so a padded graph computes exactly
what the eager forward would.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from tetriinfer.engine.host_copy import pinned, to_device
from tetriinfer.engine.prompt_logprobs import record_prompt_logprobs
from tetriinfer.engine.scheduler import StepPlan
from tetriinfer.kernels import get_kernels
from tetriinfer.model.arch import ModelArch
from tetriinfer.model.layers import ForwardContext, imported_kv, kv_cache_scales
from tetriinfer.model.moe import DENSE_MAX_TOKENS
from tetriinfer.model.parallel import SINGLE, TensorParallel
from tetriinfer.sched.lengths import blocks_for

DECODE_GRAPH_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512,
                        640, 768, 896, 1024)
MAX_GRAPH_PIECES = 64
MIXED_GRAPH_RUNGS = 8  # token-count graphs per chunk for mixed steps: padding wastes < chunk / 8


def decode_graph_batches(max_num_seqs: int, moe: bool = False) -> tuple[int, ...]:
    """Decode batch sizes captured as CUDA graphs: the rungs up to the first that holds max_num_seqs
    (beyond the last rung: eager). A mixture-of-experts model under capture runs every expert on
    every token (model.moe), so it captures only batches the eager path would run that way too;
    larger ones run eagerly, each expert on its own tokens."""
    top = next((b for b in DECODE_GRAPH_BATCHES if b >= max_num_seqs), DECODE_GRAPH_BATCHES[-1])
    if moe:
        top = min(top, DENSE_MAX_TOKENS)
    return tuple(b for b in DECODE_GRAPH_BATCHES if b <= top)


def mixed_graph_tokens(chunk_size: int) -> tuple[int, ...]:
    """Token counts captured for mixed steps: `chunk_size / MIXED_GRAPH_RUNGS` apart, up to the chunk."""
    step = max(1, -(-chunk_size // MIXED_GRAPH_RUNGS))
    return tuple(sorted({min(step * i, chunk_size) for i in range(1, MIXED_GRAPH_RUNGS + 1)}))


@dataclass
class TokensOnDevice:
    """Decode inputs not yet on the host (async scheduling): decode `decodes[i]` of the plan takes
    `tokens[rows[i]]`, sampled by the step before this one and still being read back."""

    tokens: torch.Tensor  # [num_sampled] int64, on the device
    decodes: list[int]
    rows: list[int]


@dataclass
class StepInputs:
    """Host-side (CPU) tensors of one step, laid out as ForwardContext wants them."""

    input_ids: torch.Tensor  # [num_tokens] int64 (chunk padding included)
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 for padding
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    sample_idx: torch.Tensor  # [num_sampled] int64: rows whose logits are sampled
    num_real_tokens: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    num_tokens: int
    num_seqs: int
    hidden: torch.Tensor  # output buffer [num_tokens, hidden]
    inputs: dict[str, torch.Tensor]  # the static input buffers it was captured on


class ModelRunner:
    def __init__(self, model: torch.nn.Module, arch: ModelArch, num_blocks: int, block_size: int,
                 attention_backend: str, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, max_num_seqs: int, chunk_size: int, use_cuda_graphs: bool,
                 mixed_steps: bool = False, tp: TensorParallel = SINGLE, capture_prompt_hidden: bool = False):
        self.model = model
        self.arch = arch
        self.block_size = block_size
        self.device = device
        self.kernels = get_kernels(attention_backend)
        self.tp = tp
        # With `capture_prompt_hidden`, `execute` leaves the final hidden rows of the prompts its step
        # completes (plan order, float32, on the device) in `prompt_hidden`; else it stays None.
        self.capture_prompt_hidden = capture_prompt_hidden
        self.prompt_hidden: torch.Tensor | None = None
        # Rank 0 of a tensor-parallel engine: its workers (engine.tp_worker.TPWorkers) run each step too.
        self.workers = None
        # Under tensor parallelism each rank caches the KV heads of its own attention heads.
        shape = (num_blocks, block_size, tp.split(arch.num_kv_heads, "KV heads"), arch.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(arch.num_layers)
        ]
        self.max_blocks_per_seq = blocks_for(max_model_len, block_size)
        self.chunk_size = chunk_size
        self.graphs: dict[tuple[int, int], _Graph] = {}
        # Graphs of steps that hold prompt tokens: their token counts and how many sequences they fit.
        self._chunk_tokens = mixed_graph_tokens(chunk_size) if mixed_steps else (chunk_size,)
        if arch.num_experts:  # no prompt-step graphs for MoE models (decode_graph_batches says why)
            self._chunk_tokens = ()
        self._chunk_seqs = max_num_seqs + MAX_GRAPH_PIECES if mixed_steps else MAX_GRAPH_PIECES
        self._pad_to_rung = mixed_steps  # other steps replay a graph only at its exact size
        if use_cuda_graphs:
            if device.type != "cuda":
                raise ValueError("CUDA graphs need a CUDA device")
            self._capture_graphs(max_num_seqs)

    # ---- step inputs -----------------------------------------------------------------------------
    def prepare(self, plan: StepPlan) -> StepInputs:
        ids, pos, slots, seq_lens, tables, sample_idx = [], [], [], [], [], []
        offset = 0
        for piece in plan.prefill:
            req = piece.request
            end = piece.start + piece.length
            tokens = req.prompt_token_ids[piece.start:end] if end <= len(req.prompt_token_ids) \
                else req.all_token_ids[piece.start:end]
            ids.append(np.asarray(tokens, dtype=np.int64))
            positions = np.arange(piece.start, end, dtype=np.int64)
            pos.append(positions)
            slots.append(self._slots(req.block_ids, positions))
            seq_lens.append(end)
            tables.append(req.block_ids)
            offset += piece.length
            if piece.completes_prompt:
                sample_idx.append(offset - 1)
        if plan.decode:
            n = len(plan.decode)
            # A decode computes the token at position num_computed_tokens: the newest one, whose value
            # may still be on the device (then the host's is a stale stand-in, replaced on the device).
            positions = np.fromiter((r.num_computed_tokens for r in plan.decode), dtype=np.int64, count=n)
            ids.append(np.fromiter((r.output_token_ids[-1] if r.output_token_ids else r.prompt_token_ids[-1]
                                    for r in plan.decode), dtype=np.int64, count=n))
            pos.append(positions)
            # The slot of each decode token: its position's block, then the offset inside it.
            last_blocks = np.fromiter((r.block_ids[p // self.block_size] for r, p in zip(plan.decode, positions.tolist())),
                                      dtype=np.int64, count=n)
            slots.append(last_blocks * self.block_size + positions % self.block_size)
            seq_lens.extend((positions + 1).tolist())
            tables.extend(r.block_ids for r in plan.decode)
            sample_idx.extend(range(offset, offset + n))
            offset += n
        # Chunk padding: token 0 at position 0, written nowhere, attended by nobody.
        if plan.num_padding:
            ids.append(np.zeros(plan.num_padding, dtype=np.int64))
            pos.append(np.zeros(plan.num_padding, dtype=np.int64))
            slots.append(np.full(plan.num_padding, -1, dtype=np.int64))
        # Ragged block lists into one padded array in a single scatter.
        lens = np.fromiter((len(b) for b in tables), dtype=np.int64, count=len(tables))
        table = np.zeros((len(tables), int(lens.max())), dtype=np.int32)
        flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lens.sum()))
        rows = np.repeat(np.arange(len(tables)), lens)
        table[rows, np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)] = flat
        query_lens = [p.length for p in plan.prefill] + [1] * len(plan.decode)
        query_start_loc = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start_loc[1:])
        return StepInputs(
            input_ids=torch.from_numpy(np.concatenate(ids)),
            positions=torch.from_numpy(np.concatenate(pos)),
            slot_mapping=torch.from_numpy(np.concatenate(slots)),
            block_tables=torch.from_numpy(table),
            query_start_loc=torch.from_numpy(query_start_loc),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            sample_idx=torch.tensor(sample_idx, dtype=torch.int64),
            num_real_tokens=offset,
        )

    def _slots(self, block_ids: list[int], positions: np.ndarray) -> np.ndarray:
        blocks = np.asarray(block_ids, dtype=np.int64)
        return blocks[positions // self.block_size] * self.block_size + positions % self.block_size

    # ---- execution -------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan, on_device: TokensOnDevice | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """Logits [num_sampled, vocab] of the tokens that end a prompt or are decodes, in plan order
        (prefill pieces, then decodes). With `all_logits`, logits of every real token instead."""
        inputs = self.prepare(plan)
        feed = None
        if on_device is not None and on_device.decodes:
            first_decode = sum(p.length for p in plan.prefill)
            feed = (to_device(torch.tensor([first_decode + j for j in on_device.decodes]), self.device),
                    on_device.tokens[to_device(torch.tensor(on_device.rows), self.device)])
        if self.workers is not None:
            self.workers.step(inputs, fed=feed is not None)
        hidden = self.run_model(inputs, feed)
        if self.capture_prompt_hidden:
            self._keep_prompt_hidden(hidden, inputs, plan)
        if any(p.request.wants_prompt_logprobs for p in plan.prefill):  # only requests that ask
            record_prompt_logprobs(self.model.compute_logits, hidden, plan)
        if all_logits or not plan.prefill:  # a decode-only step samples every real row, in order
            return self.model.compute_logits(hidden[: inputs.num_real_tokens])
        return self.model.compute_logits(hidden[to_device(inputs.sample_idx, self.device)])

    def _keep_prompt_hidden(self, hidden: torch.Tensor, inputs: StepInputs, plan: StepPlan) -> None:
        """`prompt_hidden`: the rows the LM head reads for the prompts this step completes (the
        first sampled rows). Under tensor parallelism rank 0's rows are the whole state: the final
        norm runs on activations the last all-reduce replicated."""
        done = sum(p.completes_prompt for p in plan.prefill)
        # A gather copies: a CUDA graph's output buffer is overwritten by the next step's replay.
        self.prompt_hidden = hidden[to_device(inputs.sample_idx[:done], self.device)].float() if done else None

    def run_model(self, inputs: StepInputs, feed: tuple[torch.Tensor, torch.Tensor] | None = None,
                  fed: bool = False) -> torch.Tensor:
        """Hidden states of every token of a prepared step. `fed` (a tensor-parallel worker): rank 0
        patched some input ids on its device (`feed`); they come by broadcast."""
        graph = self._graph_for(inputs)
        if graph is not None:
            hidden = self._replay(graph, inputs, feed)
        else:
            dev = self.device
            input_ids = to_device(inputs.input_ids, dev)
            if feed is not None:
                input_ids[feed[0]] = feed[1]
            if feed is not None or fed:
                self.tp.broadcast(input_ids)
            ctx = ForwardContext(
                slot_mapping=to_device(inputs.slot_mapping, dev),
                block_tables=to_device(inputs.block_tables, dev),
                query_start_loc=to_device(inputs.query_start_loc, dev),
                seq_lens=to_device(inputs.seq_lens, dev),
                kv_caches=self.kv_caches,
                kernels=self.kernels,
            )
            hidden = self.model(input_ids, to_device(inputs.positions, dev), ctx)
        return hidden

    # ---- CUDA graphs ------------------------------------------------------------------------------
    def _graph_for(self, inputs: StepInputs) -> _Graph | None:
        if not self.graphs:
            return None
        if inputs.num_tokens == inputs.num_seqs:  # decode only
            rung = next((b for b in DECODE_GRAPH_BATCHES if b >= inputs.num_seqs), None)
            return self.graphs.get((rung, rung))
        if inputs.num_seqs > self._chunk_seqs:
            return None
        if inputs.num_tokens in self._chunk_tokens:  # a chunk of a captured size (the profiler adds some)
            return self.graphs.get((inputs.num_tokens, self._chunk_seqs))
        if not self._pad_to_rung:
            return None
        rung = next((t for t in self._chunk_tokens if t >= inputs.num_tokens), None)
        return self.graphs.get((rung, self._chunk_seqs))

    def _capture_graphs(self, max_num_seqs: int) -> None:
        batches = decode_graph_batches(max_num_seqs, moe=bool(self.arch.num_experts))
        top = batches[-1]
        self._max_graph_tokens = max(self.chunk_size, top)
        self._static = self._static_buffers(self._max_graph_tokens, max(self._chunk_seqs, top))
        self._graph_pool = None
        shapes = [(b, b) for b in batches]
        shapes.extend((t, self._chunk_seqs) for t in self._chunk_tokens)
        for num_tokens, num_seqs in sorted(shapes, reverse=True):  # largest first: the pool fits all
            self._capture(num_tokens, num_seqs)

    def capture_prefill_graph(self, num_tokens: int) -> None:
        """Also replay prefill chunks of `num_tokens` tokens from a graph (the profiler measures
        every chunk size as an engine configured with it would run)."""
        if not self.graphs or (num_tokens, self._chunk_seqs) in self.graphs or self.arch.num_experts:
            return
        if num_tokens > self._max_graph_tokens:  # grow the static inputs; captured graphs keep theirs
            self._max_graph_tokens = num_tokens
            self._static = self._static_buffers(num_tokens, self._static["seq_lens"].shape[0])
        self._capture(num_tokens, self._chunk_seqs)
        self._chunk_tokens = tuple(sorted({*self._chunk_tokens, num_tokens}))

    def _static_buffers(self, max_tokens: int, max_seqs: int) -> dict[str, torch.Tensor]:
        dev = self.device
        return dict(
            input_ids=torch.zeros(max_tokens, dtype=torch.int64, device=dev),
            positions=torch.zeros(max_tokens, dtype=torch.int64, device=dev),
            slot_mapping=torch.full((max_tokens,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros((max_seqs, self.max_blocks_per_seq), dtype=torch.int32, device=dev),
            query_start_loc=torch.zeros(max_seqs + 1, dtype=torch.int32, device=dev),
            seq_lens=torch.zeros(max_seqs, dtype=torch.int32, device=dev),
        )

    def _capture(self, num_tokens: int, num_seqs: int) -> None:
        s = self._static
        ctx = self._static_context(num_tokens, num_seqs)
        for _ in range(2):  # warm-up: Triton compiles and the allocator settles outside the graph
            self.model(s["input_ids"][:num_tokens], s["positions"][:num_tokens], ctx)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            hidden = self.model(s["input_ids"][:num_tokens], s["positions"][:num_tokens], ctx)
        self._graph_pool = graph.pool()
        self.graphs[(num_tokens, num_seqs)] = _Graph(graph, num_tokens, num_seqs, hidden, s)
        torch.cuda.synchronize(self.device)

    def _static_context(self, num_tokens: int, num_seqs: int) -> ForwardContext:
        s = self._static
        return ForwardContext(
            slot_mapping=s["slot_mapping"][:num_tokens],
            block_tables=s["block_tables"][:num_seqs],
            query_start_loc=s["query_start_loc"][: num_seqs + 1],
            seq_lens=s["seq_lens"][:num_seqs],
            kv_caches=self.kv_caches,
            kernels=self.kernels,
        )

    def _replay(self, graph: _Graph, inputs: StepInputs,
                feed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Copy the step into the static buffers, padding sequences and tokens, and replay. `feed`:
        (rows, tokens) of input tokens already on the device."""
        s = graph.inputs
        n, seqs, t = inputs.num_tokens, inputs.num_seqs, graph.num_tokens
        dev = self.device
        s["input_ids"][:n].copy_(pinned(inputs.input_ids, dev), non_blocking=True)
        if feed is not None:
            s["input_ids"][feed[0]] = feed[1]
        s["positions"][:n].copy_(pinned(inputs.positions, dev), non_blocking=True)
        s["slot_mapping"][:n].copy_(pinned(inputs.slot_mapping, dev), non_blocking=True)
        if t > n:
            s["input_ids"][n:t].zero_()
            s["positions"][n:t].zero_()
            s["slot_mapping"][n:t].fill_(-1)
        width = inputs.block_tables.shape[1]
        s["block_tables"][:seqs, :width].copy_(pinned(inputs.block_tables, dev), non_blocking=True)
        # Padding sequences: no query tokens (their start repeats the last real end), no context.
        qsl = s["query_start_loc"][: graph.num_seqs + 1]
        qsl[: seqs + 1].copy_(pinned(inputs.query_start_loc, dev), non_blocking=True)
        qsl[seqs + 1:].fill_(int(inputs.query_start_loc[-1]))
        s["seq_lens"][:seqs].copy_(pinned(inputs.seq_lens, dev), non_blocking=True)
        s["seq_lens"][seqs: graph.num_seqs].zero_()
        graph.graph.replay()
        return graph.hidden

    # ---- KV export / import -------------------------------------------------------------------------
    def read_kv(self, block_ids: list[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a request's first `num_tokens` tokens: [num_layers, num_tokens, kv_heads, head_dim] each,
        as the cache holds them (an FP8 cache: x / the layer's scale; the receiver loads the same
        checkpoint, so it has the same scales: layers.imported_kv)."""
        slots = torch.from_numpy(self._slots(block_ids, np.arange(num_tokens))).to(self.device)
        ks = torch.stack([k.flatten(0, 1)[slots] for k, _ in self.kv_caches])
        vs = torch.stack([v.flatten(0, 1)[slots] for _, v in self.kv_caches])
        if self.workers is not None:  # every rank's KV heads, in rank order: the layout of TP 1
            ks, vs = self.workers.gather_kv(block_ids, ks, vs)
        return ks, vs

    def write_kv(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        if self.workers is not None:  # the workers take their heads; this rank keeps its own
            k, v = self.workers.scatter_kv(block_ids, k, v)
        slots = torch.from_numpy(self._slots(block_ids, np.arange(k.shape[1]))).to(self.device)
        scales = kv_cache_scales(self.model)
        for layer, (k_cache, v_cache) in enumerate(self.kv_caches):
            k_scale, v_scale = scales[layer]
            k_cache.flatten(0, 1)[slots] = imported_kv(k[layer].to(self.device), k_cache.dtype, k_scale)
            v_cache.flatten(0, 1)[slots] = imported_kv(v[layer].to(self.device), v_cache.dtype, v_scale)
