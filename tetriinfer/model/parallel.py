"""Tensor parallelism, Megatron style: one rank's view of the group and the split linear layers.

A transformer block needs two all-reduces with this split (Shoeybi et al., 2019):
- attention: q/k/v are *column* parallel (each rank owns whole heads, and the KV heads that serve
  them under GQA), so attention runs per rank on its heads with no communication; the output
  projection is *row* parallel (each rank owns the input columns of its heads) and the partial sums
  are all-reduced;
- MLP: gate/up (OPT: fc1) column parallel, down (OPT: fc2) row parallel, then one all-reduce.
Embeddings and the LM head are replicated: an embedding lookup reads only the rows of this step's
tokens, and only rank 0 samples, so only rank 0 holds and runs the LM head (no logits gather).
The cost is rank 0 reading the whole LM head each step (llama3-8b at TP 2: 1 GB of 9 GB on rank 0).

The group is a bare torch.distributed ProcessGroup (gloo on the CPU, NCCL on GPUs), not the
process's default group: a process may hold several engines, and the cluster's KV transport owns
the default group of an instance process.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TIMEOUT_S = 120.0  # of any one collective: a dead or stuck rank surfaces as an error, not a hang
SPLITS = (None, "column", "row")


class TensorParallelError(RuntimeError):
    """A collective failed or timed out, or a tensor-parallel worker died."""


@dataclass(frozen=True)
class TensorParallel:
    """This process's rank in a tensor-parallel group of `size` ranks (`group`: None when size is 1)."""

    rank: int = 0
    size: int = 1
    group: Any = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    # Rank 0: turns a failed collective into the error that says which worker died and why.
    on_error: Callable[[str], Exception] | None = None

    def split(self, n: int, what: str) -> int:
        """This rank's share of `n` (heads, KV heads, MLP features): they must divide evenly."""
        if n % self.size:
            raise ValueError(f"tensor_parallel_size {self.size} does not divide the model's {n} {what}")
        return n // self.size

    def _wait(self, work, x: torch.Tensor) -> None:
        try:
            # NCCL: wait() only orders the current stream after the collective (the CPU runs on; the
            # group's own timeout, set at creation, aborts a stuck one), where a wait with a timeout
            # would block the CPU. Gloo: the CPU waits, at most timeout_s.
            done = work.wait() if x.is_cuda else work.wait(timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise self._error(f"a collective failed: {e}") from e
        if done is False:
            raise self._error(f"a collective timed out after {self.timeout_s:.0f} s")

    def _error(self, what: str) -> Exception:
        what = f"tensor-parallel rank {self.rank}: {what}"
        return self.on_error(what) if self.on_error is not None else TensorParallelError(what)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place."""
        if self.size > 1:
            self._wait(self.group.allreduce([x]), x)
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.size > 1:
            import torch.distributed as dist

            opts = dist.BroadcastOptions()
            opts.rootRank = src
            self._wait(self.group.broadcast([x], opts), x)
        return x

    def send(self, x: torch.Tensor, dst: int, tag: int = 0) -> None:
        x = x.contiguous()
        self._wait(self.group.send([x], dst, tag), x)

    def recv(self, x: torch.Tensor, src: int, tag: int = 0) -> torch.Tensor:
        self._wait(self.group.recv([x], src, tag), x)
        return x


SINGLE = TensorParallel()


def make_group(store, rank: int, size: int, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S):
    """A bare process group over `store` (a torch.distributed Store all ranks reach): gloo for the
    CPU, NCCL for CUDA. Blocks until every rank has joined or `timeout_s` passed."""
    import torch.distributed as dist

    store = dist.PrefixStore("tetriinfer-tp", store)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=timeout_s)
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    return dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=timeout_s))


class Linear(nn.Module):
    """y = x W^T + b with W [out, in], split over the tensor-parallel ranks:
    - `column`: each rank owns out/size rows of W (and of b); outputs stay split;
    - `row`: each rank owns in/size columns of W; partial products are all-reduced, then b added once;
    - None: replicated.
    The weight may be FP8 with per-output-channel scales (`weight_scale`, set by model.quant)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel = SINGLE,
                 split: str | None = None):
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.tp, self.split = tp, split
        if split == "column":
            out_features = tp.split(out_features, "output features")
        elif split == "row":
            in_features = tp.split(in_features, "input features")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_parameter("weight_scale", None)  # FP8 weights only: [out] float32 (model.quant)

    def shard_dim(self, param: str) -> int | None:
        """The dimension of a full (checkpoint) tensor that is split across ranks for `param`."""
        if self.split == "column":
            return 0
        if self.split == "row" and param == "weight":
            return 1
        return None  # replicated (a row-parallel bias and weight scale cover every output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split != "row" or self.tp.size == 1:
            return matmul(x, self.weight, self.weight_scale, self.bias)
        y = self.tp.all_reduce(matmul(x, self.weight, self.weight_scale, None))
        return y if self.bias is None else y + self.bias


def matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
           bias: torch.Tensor | None) -> torch.Tensor:
    if weight_scale is None:
        return F.linear(x, weight, bias)
    from tetriinfer.model.quant import fp8_linear

    return fp8_linear(x, weight, weight_scale, bias)


def shard(tensor: torch.Tensor, dim: int | None, tp: TensorParallel) -> torch.Tensor:
    """This rank's slice of a full tensor along `dim` (the whole tensor when dim is None)."""
    if dim is None or tp.size == 1:
        return tensor
    size = tp.split(tensor.shape[dim], f"elements of a checkpoint tensor along dim {dim}")
    return tensor.narrow(dim, tp.rank * size, size)
