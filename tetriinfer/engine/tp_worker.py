"""Tensor-parallel workers: one process per extra rank, owned and stopped by the engine (rank 0).

Rank 0 schedules and samples; it sends each step's prepared inputs (a few small arrays) down a
pipe to every worker, and all ranks then run the same forward pass, meeting in the all-reduces
(model.parallel). The pipe carries control messages only; tensors that are large or live on the
device (KV shards, input ids sampled on the device) go over the process group.

Lifetime: workers are daemonic spawn processes. The engine stops them (`stop`, also run by a
finalizer when the engine is collected and at interpreter exit); a worker whose parent dies exits
by itself within `PARENT_POLL_S`. Every wait has a timeout. A worker that dies makes the next
collective fail on rank 0, which raises TensorParallelError naming the rank, its exit code and,
when it raised, its traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import traceback
import weakref
from dataclasses import dataclass, fields
from datetime import timedelta

import numpy as np
import torch

from tetriinfer.config import EngineConfig
from tetriinfer.model.parallel import DEFAULT_TIMEOUT_S, TensorParallel, TensorParallelError, make_group

PARENT_POLL_S = 1.0  # a worker checks this often that its engine is still alive
STOP_TIMEOUT_S = 10.0
_K_TAG, _V_TAG = 1, 2


def rank_device(device: str, rank: int) -> torch.device:
    """Rank r's device: the CPU for every rank, or the r-th GPU counting from the engine's."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    return torch.device("cuda", (dev.index or 0) + rank)


@dataclass(frozen=True)
class WorkerSpec:
    config: EngineConfig
    rank: int
    store_port: int
    timeout_s: float


@dataclass(frozen=True)
class RunnerSpec:
    """What rank 0 decides after loading (cache size, context, kernels) and every rank must share."""

    num_blocks: int
    max_model_len: int
    attention_backend: str


def _pack(inputs) -> dict:
    """StepInputs as numpy arrays: cheap to pickle, no shared-memory handles."""
    return {f.name: (v.numpy() if isinstance(v := getattr(inputs, f.name), torch.Tensor) else v)
            for f in fields(inputs)}


def _unpack(packed: dict):
    from tetriinfer.engine.model_runner import StepInputs

    return StepInputs(**{k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in packed.items()})


class TPWorkers:
    """Rank 0's handle on ranks 1..size-1: starts them, forms the group, drives them, stops them."""

    def __init__(self, config: EngineConfig, timeout_s: float = DEFAULT_TIMEOUT_S):
        import torch.distributed as dist

        self.size = config.tensor_parallel_size
        _check_divides(config)  # before any process starts
        self.device = rank_device(config.device, 0)
        self.timeout_s = timeout_s
        self._store = dist.TCPStore("127.0.0.1", 0, self.size, is_master=True,
                                    timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        ctx = mp.get_context("spawn")  # never fork a process that holds torch threads or a CUDA context
        self.procs, self.conns = [], []
        for rank in range(1, self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(WorkerSpec(config, rank, self._store.port, timeout_s), child),
                               name=f"tetriinfer-tp-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)
        try:
            group = make_group(self._store, 0, self.size, self.device, timeout_s)
        except Exception as e:
            raise self._failure(f"the tensor-parallel group did not form: {e}") from e
        self.tp = TensorParallel(0, self.size, group, timeout_s, on_error=self._failure)

    # ---- lifetime ------------------------------------------------------------------------------
    def start_runners(self, spec: RunnerSpec) -> None:
        """Workers build their model runners (KV cache shards) and report ready, within the timeout."""
        self._send(("init", spec))
        deadline = time.monotonic() + self.timeout_s
        for rank, conn in enumerate(self.conns, start=1):
            if not conn.poll(max(deadline - time.monotonic(), 0.0)):
                raise self._failure(f"tensor-parallel rank {rank} was not ready after {self.timeout_s:.0f} s")
            msg = conn.recv()
            if msg[0] != "ready":
                raise self._failure(f"tensor-parallel rank {rank} failed to start")

    def stop(self) -> None:
        self._finalizer()

    @property
    def alive(self) -> bool:
        return self._finalizer.alive and all(p.is_alive() for p in self.procs)

    def status(self, settle_s: float = 1.0) -> str:
        """What became of the workers: exit codes and the traceback of one that raised. A worker
        that just died may take a moment to be reaped, so wait up to `settle_s` for one."""
        deadline = time.monotonic() + settle_s
        while all(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.01)
        lines = []
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            state = "alive" if proc.is_alive() else f"exited with code {proc.exitcode}"
            lines.append(f"rank {rank} (pid {proc.pid}) {state}")
            try:
                while conn.poll(0):
                    msg = conn.recv()
                    if msg[0] == "error":
                        lines.append(f"rank {rank} raised:\n{msg[1]}")
            except (EOFError, OSError):
                pass
        return "; ".join(lines)

    def _failure(self, what: str) -> TensorParallelError:
        """Stop everything and say why: this engine cannot go on without all its ranks."""
        error = TensorParallelError(f"{what}. Workers: {self.status()}. The engine is stopped; start a new one.")
        self.stop()
        return error

    def _send(self, msg: tuple) -> None:
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            if not proc.is_alive():
                raise self._failure(f"tensor-parallel rank {rank} is gone")
            try:
                conn.send(msg)
            except (BrokenPipeError, EOFError, OSError) as e:
                raise self._failure(f"tensor-parallel rank {rank} is unreachable ({e})") from e

    # ---- per step ------------------------------------------------------------------------------
    def step(self, inputs, fed: bool) -> None:
        self._send(("step", _pack(inputs), fed))

    def gather_kv(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's K/V heads of a request (rank 0's given), concatenated in rank order."""
        self._send(("read_kv", list(block_ids), k.shape[1]))
        ks, vs = [k], [v]
        for rank in range(1, self.size):
            ks.append(self.tp.recv(torch.empty_like(k), rank, _K_TAG))
            vs.append(self.tp.recv(torch.empty_like(v), rank, _V_TAG))
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def scatter_kv(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor,
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Send each worker its KV heads of a request; rank 0's own share is returned."""
        k, v = k.to(self.device, dtype), v.to(self.device, dtype)
        heads = k.shape[2] // self.size
        shard = lambda t, r: t[:, :, r * heads:(r + 1) * heads].contiguous()  # noqa: E731
        self._send(("write_kv", list(block_ids), tuple(shard(k, 0).shape), k.dtype))
        for rank in range(1, self.size):
            self.tp.send(shard(k, rank), rank, _K_TAG)
            self.tp.send(shard(v, rank), rank, _V_TAG)
        return shard(k, 0), shard(v, 0)


def _check_divides(config: EngineConfig) -> None:
    from tetriinfer.model.arch import ModelArch
    from tetriinfer.model.loader import resolve_model

    arch = ModelArch.from_hf_config(resolve_model(config.model)[0])
    tp = TensorParallel(size=config.tensor_parallel_size)
    tp.split(arch.num_heads, "attention heads")
    tp.split(arch.num_kv_heads, "KV heads")
    tp.split(arch.intermediate_size, "MLP features")
    if torch.device(config.device).type == "cuda" and \
            rank_device(config.device, tp.size - 1).index >= torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size {tp.size} from {config.device} needs GPUs up to "
                         f"{rank_device(config.device, tp.size - 1)}; this machine has {torch.cuda.device_count()}")


def _stop(procs: list, conns: list) -> None:
    """Ask every worker to stop, then terminate and kill whatever is left, each wait bounded."""
    for conn in conns:
        try:
            conn.send(("stop",))
        except (BrokenPipeError, EOFError, OSError):
            pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 0.0))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
    for conn in conns:
        conn.close()


# ---- the worker process --------------------------------------------------------------------------
def worker_main(spec: WorkerSpec, conn) -> None:
    """Entry point of rank `spec.rank`: join the group, load this rank's shard, serve rank 0's steps."""
    try:
        with torch.inference_mode():
            _serve(spec, conn)
    except BaseException:  # noqa: BLE001  -- rank 0 reports it
        try:
            conn.send(("error", traceback.format_exc()))
        except (BrokenPipeError, OSError):
            pass
        sys.exit(1)


def _serve(spec: WorkerSpec, conn) -> None:
    import torch.distributed as dist

    from tetriinfer.engine.model_runner import ModelRunner
    from tetriinfer.model.loader import TORCH_DTYPES, load_model
    from tetriinfer.model.quant import kv_cache_torch_dtype

    config, rank = spec.config, spec.rank
    device = rank_device(config.device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif torch.get_num_threads() > 1:  # CPU ranks share the cores
        torch.set_num_threads(max(1, torch.get_num_threads() // config.tensor_parallel_size))
    store = dist.TCPStore("127.0.0.1", spec.store_port, config.tensor_parallel_size, is_master=False,
                          timeout=timedelta(seconds=spec.timeout_s))
    group = make_group(store, rank, config.tensor_parallel_size, device, spec.timeout_s)
    tp = TensorParallel(rank, config.tensor_parallel_size, group, spec.timeout_s)
    loaded = load_model(config.model, config.dtype, str(device), config.load_format, config.seed, tp=tp,
                        quantization=config.quantization)
    msg = _next(conn)
    if msg is None or msg[0] != "init":
        return
    rs: RunnerSpec = msg[1]
    runner = ModelRunner(loaded.model, loaded.arch, rs.num_blocks, config.cache.block_size, rs.attention_backend,
                         device, kv_cache_torch_dtype(config.kv_cache_dtype, TORCH_DTYPES[config.dtype]), rs.max_model_len, config.scheduler.max_num_seqs,
                         config.scheduler.chunk_size, use_cuda_graphs=False,
                         mixed_steps=config.scheduler.step_policy == "mixed", tp=tp)
    conn.send(("ready",))
    while (msg := _next(conn)) is not None:
        kind = msg[0]
        if kind == "step":
            runner.run_model(_unpack(msg[1]), fed=msg[2])
        elif kind == "read_kv":
            k, v = runner.read_kv(msg[1], msg[2])
            tp.send(k, 0, _K_TAG)
            tp.send(v, 0, _V_TAG)
        elif kind == "write_kv":
            _, block_ids, shape, dtype = msg
            k = tp.recv(torch.empty(shape, dtype=dtype, device=device), 0, _K_TAG)
            v = tp.recv(torch.empty(shape, dtype=dtype, device=device), 0, _V_TAG)
            runner.write_kv(block_ids, k, v)


def _next(conn):
    """The next message from rank 0; None once it says stop, closes the pipe, or dies."""
    parent = mp.parent_process()
    while not conn.poll(PARENT_POLL_S):
        if parent is not None and not parent.is_alive() or os.getppid() == 1:
            return None
    try:
        msg = conn.recv()
    except (EOFError, OSError):
        return None
    return None if msg[0] == "stop" else msg
