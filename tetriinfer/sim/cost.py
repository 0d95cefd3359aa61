"""How long the simulated hardware takes: one forward pass, one KV transfer, and how much KV fits.

Two models behind one protocol: `RooflineCostModel` (datasheet GPU specs and model shapes with
efficiency factors) and `TableCostModel` (a profile measured on a real GPU, docs/profile-format.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from tetriinfer.sim.hardware import GpuSpec, get_gpu
from tetriinfer.sim.model_shape import DTYPE_BYTES, ModelShape
from tetriinfer.sim.profile import Profile, load_profile


@runtime_checkable
class CostModel(Protocol):
    def step_time(self, prefill_tokens: int, prefill_context: int, decode_seqs: int, decode_context: int) -> float:
        """Seconds for one forward pass of one instance.

        `prefill_tokens` chunk tokens (padding included) attend to `prefill_context` cached tokens (the
        earlier part of the prompt they continue), and `decode_seqs` decode tokens attend to
        `decode_context` context tokens in total. Either part may be 0.
        """
        ...

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token occupies on its instance (all layers, all shards)."""
        ...

    def transfer_time(self, num_bytes: int) -> float:
        """Seconds to move `num_bytes` of KV from a prefill to a decode instance."""
        ...

    def kv_capacity_tokens(self) -> int:
        """KV tokens one instance holds once its weights are loaded."""
        ...


# The paper's prefill-to-decode link: 200 Gbps InfiniBand between hosts (its NVLink is 300 GB/s).
DEFAULT_LINK_GBPS = 200.0
# Per transfer: RDMA set-up and the receiver's block bookkeeping, not the wire latency alone.
DEFAULT_LINK_LATENCY_S = 1e-4


@dataclass(frozen=True)
class KvLink:
    """The link KV moves over: `gbps` gigabits per second, plus a fixed cost per transfer."""

    gbps: float = DEFAULT_LINK_GBPS
    latency_s: float = DEFAULT_LINK_LATENCY_S

    def __post_init__(self) -> None:
        if self.gbps <= 0 or self.latency_s < 0:
            raise ValueError(f"link needs gbps > 0 and latency_s >= 0, got {self.gbps}, {self.latency_s}")

    def transfer_time(self, num_bytes: int) -> float:
        return self.latency_s + num_bytes * 8 / (self.gbps * 1e9)


@dataclass(frozen=True)
class RooflineCostModel:
    """Step time = fixed overhead + bytes moved / effective bandwidth + FLOPs / effective FLOP rate.

    Memory and compute time add rather than overlap (max): measured GEMMs reach neither roof near the
    ridge point, and the sum reproduces their soft knee. Bytes: the weights once per step, the cached
    KV read by attention, the new KV written. FLOPs: 2 per weight per token through the decoder
    layers, the LM head for tokens that sample, and 4 * heads * head_dim per (query, key) pair per
    layer for attention. A prefill chunk's pairs are counted as one prompt's (each chunk token sees
    `prefill_context` cached tokens and half the chunk): exact for one prompt, an upper bound for a
    chunk packing several. With tensor parallelism, work and bytes split evenly over `tp` GPUs, and
    each layer adds two ring all-reduces of the activations over NVLink.

    Default efficiencies (fractions of the datasheet peaks) were set so that on an H100 Llama-3-8B
    decodes at batch 1 in ~5.8 ms and prefills ~47k tokens/s in 2048-token chunks, and so that
    OPT-13B prefill on a V100 stops gaining much throughput past ~512-token chunks, as the paper
    reports (docs/profile-format.md, "Roofline against measurements").
    """

    gpu: GpuSpec
    model: ModelShape
    tp: int = 1
    link: KvLink = field(default_factory=KvLink)
    gemm_efficiency: float = 0.8
    attention_efficiency: float = 0.5
    bandwidth_efficiency: float = 0.9
    step_overhead_s: float = 4.5e-4  # launch, scheduling and sampling per forward pass
    allreduce_latency_s: float = 5e-6
    memory_fraction: float = 0.9  # of each GPU's memory the engine may use (weights + KV)
    activation_reserve_gib: float = 1.0  # per GPU, for activations and the CUDA graphs

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        for name in ("gemm_efficiency", "attention_efficiency", "bandwidth_efficiency", "memory_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        m, tp = self.model, self.tp
        # Per-GPU rates and per-GPU work coefficients, precomputed: step_time runs millions of times.
        if tp > 1:
            ring_bytes_per_token = 2 * (tp - 1) / tp * m.hidden_size * DTYPE_BYTES
            allreduce_s_per_token = 2 * m.num_layers * ring_bytes_per_token / (self.gpu.nvlink_gbps * 1e9)
            allreduce_s_fixed = 2 * m.num_layers * self.allreduce_latency_s
        else:
            allreduce_s_per_token = allreduce_s_fixed = 0.0
        coefficients = {
            "_bytes_per_s": self.gpu.hbm_gbps * 1e9 * self.bandwidth_efficiency,
            "_gemm_flops_per_s": self.gpu.peak_tflops * 1e12 * self.gemm_efficiency,
            "_attention_flops_per_s": self.gpu.peak_tflops * 1e12 * self.attention_efficiency,
            "_weight_bytes": m.weight_bytes_read_per_step / tp,
            "_kv_bytes": m.kv_bytes_per_token / tp,
            "_layer_flops_per_token": 2 * m.layer_params / tp,
            "_lm_head_flops_per_token": 2 * m.lm_head_params / tp,
            "_attention_flops_per_pair": 4 * m.num_layers * m.num_heads * m.head_dim / tp,
            "_allreduce_s_per_token": allreduce_s_per_token,
            "_allreduce_s_fixed": allreduce_s_fixed,
        }
        for name, value in coefficients.items():
            object.__setattr__(self, name, value)  # frozen: the knobs cannot drift from these
        if self.kv_capacity_tokens() < 1:
            raise ValueError(
                f"{m.name} ({m.weight_bytes / 2**30:.1f} GiB of weights) leaves no KV cache room on "
                f"{tp} x {self.gpu.name} at memory_fraction={self.memory_fraction}; raise tp"
            )

    @classmethod
    def from_names(
        cls,
        gpu: str = "h100",
        model: str = "llama3-8b",
        tp: int = 1,
        link_gbps: float = DEFAULT_LINK_GBPS,
        link_latency_s: float = DEFAULT_LINK_LATENCY_S,
        **overrides,
    ) -> "RooflineCostModel":
        """A roofline for a GPU of sim/hardware.py and a model preset; `overrides` set efficiencies."""
        return cls(
            gpu=get_gpu(gpu),
            model=ModelShape.from_preset(model),
            tp=tp,
            link=KvLink(link_gbps, link_latency_s),
            **overrides,
        )

    def step_time(self, prefill_tokens: int, prefill_context: int, decode_seqs: int, decode_context: int) -> float:
        tokens = prefill_tokens + decode_seqs
        if tokens == 0:
            return 0.0
        sampling_tokens = decode_seqs + (1 if prefill_tokens else 0)
        gemm_flops = tokens * self._layer_flops_per_token + sampling_tokens * self._lm_head_flops_per_token
        pairs = prefill_tokens * (prefill_context + prefill_tokens / 2) + decode_context
        moved_bytes = self._weight_bytes + self._kv_bytes * (prefill_context + decode_context + tokens)
        return (
            self.step_overhead_s
            + moved_bytes / self._bytes_per_s
            + gemm_flops / self._gemm_flops_per_s
            + pairs * self._attention_flops_per_pair / self._attention_flops_per_s
            + self._allreduce_s_fixed
            + tokens * self._allreduce_s_per_token
        )

    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token

    def transfer_time(self, num_bytes: int) -> float:
        return self.link.transfer_time(num_bytes)

    def kv_capacity_tokens(self) -> int:
        usable = self.tp * (self.gpu.memory_bytes * self.memory_fraction - self.activation_reserve_gib * 2**30)
        return max(int((usable - self.model.weight_bytes) // self.model.kv_bytes_per_token), 0)


@dataclass(frozen=True)
class TableCostModel:
    """Step times interpolated in a measured profile (sim/profile.py).

    A mixed step (prefill chunk plus decodes, the Sarathi baseline) is priced as a prefill chunk that
    also carries the decode tokens through the GEMMs, plus the decode batch's extra attention time
    over its context (its time at that context minus its time at the smallest profiled context).
    """

    profile: Profile
    link: KvLink = field(default_factory=KvLink)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        link_gbps: float = DEFAULT_LINK_GBPS,
        link_latency_s: float = DEFAULT_LINK_LATENCY_S,
    ) -> "TableCostModel":
        return cls(load_profile(path), KvLink(link_gbps, link_latency_s))

    def step_time(self, prefill_tokens: int, prefill_context: int, decode_seqs: int, decode_context: int) -> float:
        if decode_seqs == 0:
            return self.profile.prefill(prefill_tokens, prefill_context) if prefill_tokens else 0.0
        decode = self.profile.decode
        context_per_seq = decode_context / decode_seqs
        if prefill_tokens == 0:
            return decode(decode_seqs, context_per_seq)
        decode_attention = decode(decode_seqs, context_per_seq) - decode(decode_seqs, decode.cols[0])
        return self.profile.prefill(prefill_tokens + decode_seqs, prefill_context) + max(decode_attention, 0.0)

    def kv_bytes_per_token(self) -> int:
        return self.profile.kv_bytes_per_token

    def transfer_time(self, num_bytes: int) -> float:
        return self.link.transfer_time(num_bytes)

    def kv_capacity_tokens(self) -> int:
        return self.profile.kv_capacity_tokens
