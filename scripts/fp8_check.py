"""FP8 on a CUDA GPU: does Hopper's `torch._scaled_mm` path agree with the reference path, and how
much faster is a llama3-8b decode step in FP8 than in bf16?

    python scripts/fp8_check.py --out fp8_check.json [--device cuda:0] [--batch-sizes 1 32 128 256]

1. Kernel vs reference: `fp8_linear` through `_scaled_mm` and through the reference (dequantize to
   float32, multiply) on the llama3-8b projection shapes at each batch size; both get the same FP8
   operands, so they differ only by accumulation order and the bf16 rounding of the output.
2. Decode step time of the llama3-8b preset (random weights), bf16 and `quantization="fp8"`, at
   each batch size and `--context` tokens per sequence, as the engine serves it (CUDA graphs,
   sampling included; engine.profiler), beside a bandwidth roofline: the bytes the step must read
   (weights + KV) over the device-to-device copy bandwidth measured in the same run.
Prints a short table; writes everything as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, installed or not
from tetriinfer.model.quant import fp8_linear, has_scaled_mm, quantize_weight  # noqa: E402

# (name, in, out) of llama3-8b's projections as the engine fuses them
LLAMA3_8B_SHAPES = (("qkv_proj", 4096, 6144), ("o_proj", 4096, 4096), ("gate_up_proj", 4096, 28672),
                    ("down_proj", 14336, 4096))
MAX_KERNEL_ERROR = 2e-2  # relative to the reference's largest |value|: a few bf16 ulps


def check_kernel(device: torch.device, batch_sizes: list[int]) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for name, k, n in LLAMA3_8B_SHAPES:
        w_q, w_scale = quantize_weight(torch.randn(n, k, device=device, generator=gen, dtype=torch.bfloat16) * 0.02)
        for m in batch_sizes:
            x = torch.randn(m, k, device=device, generator=gen, dtype=torch.bfloat16)
            kernel = fp8_linear(x, w_q, w_scale, None, use_kernel=True).float()
            ref = fp8_linear(x, w_q, w_scale, None, use_kernel=False).float()
            err = ((kernel - ref).abs().max() / ref.abs().max()).item()
            rows.append({"shape": name, "m": m, "k": k, "n": n, "rel_max_error": err, "ok": err <= MAX_KERNEL_ERROR})
    return rows


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted as the bytes read)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * nbytes / min(times)  # a copy reads and writes every byte


def time_decode(device: str, quantization: str | None, batch_sizes: list[int], context: int,
                bandwidth: float, model: str = "llama3-8b") -> list[dict]:
    from tetriinfer import LLM
    from tetriinfer.engine.profiler import profile_steps

    blocks = max(batch_sizes) * (-(-(context + 1) // 16) + 1) + 64
    engine = LLM(model, device=device, dtype="bfloat16", quantization=quantization, num_blocks=blocks,
                 max_num_seqs=max(batch_sizes), enable_prefix_caching=False).engine
    weight_bytes = sum(p.nbytes for p in engine.runner.model.parameters())
    try:
        times = profile_steps(engine, [], [], batch_sizes, [context], repeats=20).decode
    finally:
        engine.close()
    rows = []
    for b, (seconds,) in zip(batch_sizes, times):
        step_bytes = weight_bytes + b * (context + 1) * engine.kv_bytes_per_token
        rows.append({"weights": quantization or "bf16", "batch": b, "context": context, "step_ms": seconds * 1e3,
                     "roofline_ms": step_bytes / bandwidth * 1e3, "weight_gb": weight_bytes / 1e9})
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128, 256])
    p.add_argument("--context", type=int, default=512, help="tokens per sequence before the decode step")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8_check needs a CUDA GPU (it compares torch._scaled_mm with the CPU-safe reference)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.cuda.set_device(device)
    if not has_scaled_mm(device):
        print(f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores (compute capability 8.9+ needed)",
              file=sys.stderr)
        return 2

    kernel = check_kernel(device, args.batch_sizes)
    print(f"_scaled_mm vs reference (max error allowed {MAX_KERNEL_ERROR:.0e} of the largest value):")
    for r in kernel:
        print(f"  {r['shape']:<13} m={r['m']:<4} rel_max_error={r['rel_max_error']:.2e} {'ok' if r['ok'] else 'FAIL'}")

    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s")
    decode = []
    for quantization in (None, "fp8"):
        decode += time_decode(args.device, quantization, args.batch_sizes, args.context, bandwidth)
    print(f"llama3-8b decode step, context {args.context} per sequence (ms; roofline = bytes read / copy bandwidth)")
    print(f"  {'batch':>5} {'bf16':>8} {'roof':>7} {'fp8':>8} {'roof':>7} {'fp8 speedup':>11}")
    by = {(r["weights"], r["batch"]): r for r in decode}
    for b in args.batch_sizes:
        bf, f8 = by[("bf16", b)], by[("fp8", b)]
        print(f"  {b:>5} {bf['step_ms']:>8.2f} {bf['roofline_ms']:>7.2f} {f8['step_ms']:>8.2f} "
              f"{f8['roofline_ms']:>7.2f} {bf['step_ms'] / f8['step_ms']:>10.2f}x")

    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "host": platform.node(),
              "copy_bandwidth_bytes_per_s": bandwidth, "kernel_check": kernel, "decode": decode,
              "kernel_ok": all(r["ok"] for r in kernel)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if result["kernel_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
