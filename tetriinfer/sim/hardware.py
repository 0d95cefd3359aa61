"""Accelerator specs the roofline cost model reads: datasheet peaks, SXM parts, dense 16-bit math.

Memory is what `nvidia-smi` reports as total (a little under the marketing figure). NVLink bandwidth
is one direction per GPU (the datasheet's bidirectional total halved): what a ring all-reduce sees.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    peak_tflops: float  # dense fp16/bf16 tensor-core TFLOP/s
    hbm_gbps: float  # HBM bandwidth, GB/s (1e9 bytes)
    nvlink_gbps: float  # NVLink bandwidth per direction, GB/s

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


GPUS: dict[str, GpuSpec] = {
    # V100 has no bf16; its 16-bit figure is fp16 (the paper's OPT-13B runs in fp16).
    "v100": GpuSpec("V100-SXM2-32GB", memory_gib=31.7, peak_tflops=125.0, hbm_gbps=900.0, nvlink_gbps=150.0),
    "a100": GpuSpec("A100-SXM4-80GB", memory_gib=79.3, peak_tflops=312.0, hbm_gbps=2039.0, nvlink_gbps=300.0),
    "h100": GpuSpec("H100-SXM5-80GB", memory_gib=79.6, peak_tflops=989.0, hbm_gbps=3350.0, nvlink_gbps=450.0),
    "h200": GpuSpec("H200-SXM-141GB", memory_gib=140.4, peak_tflops=989.0, hbm_gbps=4800.0, nvlink_gbps=450.0),
}


def get_gpu(name: str) -> GpuSpec:
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known GPUs: {', '.join(GPUS)}")
    return GPUS[key]
