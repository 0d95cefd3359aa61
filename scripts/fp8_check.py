"""FP8 on a CUDA GPU: does Hopper's `torch._scaled_mm` path agree with the reference path, and how
much faster is a llama3-8b decode step in FP8 than in bf16?

    python scripts/fp8_check.py --out fp8_check.json [--device cuda:0] [--batch-sizes 1 32 128 256]
                                [--variants bf16 fp8 ...] [--w8a16-max-m 16]

1. Kernel vs reference: `_scaled_mm` and the reference (dequantize to
   float32, multiply) on the llama3-8b projection shapes at each batch size; both get the same FP8
   operands, so they differ only by accumulation order and the bf16 rounding of the output. Then the
   Triton kernels of kernels.fp8_quant against their torch references on the same shapes: the fused
   per-token quantization bit for bit (scales and e4m3 bits), the W8A16 GEMM within two bf16 ulps.
2. Decode step time of the llama3-8b preset (random weights) in each of VARIANTS (bf16; FP8 W8A8
   with the fused Triton quantization; the same with the old torch quantization; W8A16 for batches
   up to --w8a16-max-m and the GEMV up to --gemv-max-m, W8A8 above; W8A8 with the FP8 KV cache), at each batch size and `--context`
   tokens per sequence, as the engine serves it (CUDA graphs, sampling included; engine.profiler),
   beside a bandwidth roofline: the bytes the step must read (weights + KV) over the device-to-device
   copy bandwidth measured in the same run.
3. One `--chunk`-token prefill chunk in each precision, its linear-layer FLOP/s against the bf16
   and FP8 GEMM peaks measured in the same run (one 8192^3 torch.mm / torch._scaled_mm).
Prints a short table; writes everything as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, installed or not
from tetriinfer.model import quant  # noqa: E402
from tetriinfer.model.quant import (fp8_linear, has_scaled_mm, quantize_per_token, quantize_weight,  # noqa: E402
                                    w8a16_matmul_ref)

# (name, in, out) of llama3-8b's projections as the engine fuses them
LLAMA3_8B_SHAPES = (("qkv_proj", 4096, 6144), ("o_proj", 4096, 4096), ("gate_up_proj", 4096, 28672),
                    ("down_proj", 14336, 4096))
MAX_KERNEL_ERROR = 2e-2  # relative to the reference's largest |value|: a few bf16 ulps
# label: (quantization, kv_cache_dtype, quant.ACT_QUANT, W8A16 GEMV and GEMM on); the switches are set
# before the engine is built, so its CUDA graphs capture that path. `fp8` is W8A8 throughout (cuBLAS);
# `fp8-w8a16`: the GEMV and the W8A16 GEMM up to --w8a16-max-m tokens, then the engine's own switches
# (the Triton W8A8 GEMM up to quant.TRITON_W8A8_MAX_M tokens, cuBLAS W8A8 above).
VARIANTS = {"bf16": (None, "auto", "triton", False), "fp8": ("fp8", "auto", "triton", False),
            "fp8-torchquant": ("fp8", "auto", "torch", False), "fp8-w8a16": ("fp8", "auto", "triton", True),
            "fp8+fp8kv": ("fp8", "fp8", "triton", False)}


def check_kernel(device: torch.device, batch_sizes: list[int]) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for name, k, n in LLAMA3_8B_SHAPES:
        w_q, w_scale = quantize_weight(torch.randn(n, k, device=device, generator=gen, dtype=torch.bfloat16) * 0.02)
        for m in batch_sizes:
            x = torch.randn(m, k, device=device, generator=gen, dtype=torch.bfloat16)
            ref = fp8_linear(x, w_q, w_scale, None, use_kernel=False).float()
            x_q, x_scale = quantize_per_token(x)
            kernel = quant.fp8_matmul_scaled_mm(x_q, x_scale, w_q, w_scale, torch.bfloat16).float()
            err = ((kernel - ref).abs().max() / ref.abs().max()).item()
            rows.append({"shape": name, "m": m, "k": k, "n": n, "rel_max_error": err, "ok": err <= MAX_KERNEL_ERROR})
    return rows


def graph_us(fn, reps: int = 200) -> float:
    """Microseconds per call of `fn`, the mean of `reps` calls captured in one CUDA graph (so launch
    overhead is left out), after a warm-up call and a warm-up replay."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / reps


def time_checked(cands: dict, reference, timer=None) -> dict[str, dict]:
    """Each candidate `label -> fn` checked, then timed: {"us": ...}, or {"error": ...} when its
    output is more than MAX_KERNEL_ERROR of the largest value off `reference(label)` (None: not
    checked) or it raises (a config that does not compile or fit is recorded and skipped)."""
    timer = timer or graph_us
    timings = {}
    for label, fn in cands.items():
        try:
            want = reference(label)
            if want is not None:
                err = ((fn().float() - want).abs().max() / want.abs().max()).item()
                if err > MAX_KERNEL_ERROR:
                    timings[label] = {"error": f"rel error {err:.3g}"}
                    continue
            timings[label] = {"us": timer(fn)}
        except Exception as e:
            timings[label] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    return timings


def time_gemms(device: torch.device, ms: list[int]) -> list[dict]:
    """Microseconds of one projection at each token count m, by each path: bf16 torch.mm, FP8
    _scaled_mm (activations already quantized), the W8A16 GEMM and the W8A16 GEMV where they take m
    rows (graph_us)."""
    from tetriinfer.kernels.fp8_quant import GEMV_MAX_ROWS, W8A16_MAX_ROWS, w8a16_gemv, w8a16_matmul

    rows = []
    gen = torch.Generator(device=device).manual_seed(2)
    for name, k, n in LLAMA3_8B_SHAPES:
        w = torch.randn(n, k, device=device, generator=gen, dtype=torch.bfloat16) * 0.02
        w_q, w_scale = quantize_weight(w)
        for m in ms:
            x = torch.randn(m, k, device=device, generator=gen, dtype=torch.bfloat16)
            x_q, x_scale = quantize_per_token(x)
            paths = {"bf16": lambda: x @ w.t(),
                     "fp8": lambda: quant.fp8_matmul_scaled_mm(x_q, x_scale, w_q, w_scale, torch.bfloat16)}
            if m <= W8A16_MAX_ROWS:
                paths["w8a16"] = lambda: w8a16_matmul(x, w_q, w_scale)
            if m <= GEMV_MAX_ROWS:
                paths["gemv"] = lambda: w8a16_gemv(x, w_q, w_scale)
            rows.append({"shape": name, "m": m, **{path: graph_us(fn) for path, fn in paths.items()}})
    return rows


def check_triton_kernels(device: torch.device, batch_sizes: list[int], w8a16_max_m: int) -> list[dict]:
    """kernels.fp8_quant against its references on the projection shapes: the fused quantization's
    mismatched scales and e4m3 values (must be 0), and the W8A16 GEMM's largest error in bf16 ulps of
    the reference (<= 2) at batch sizes up to its bound."""
    from tetriinfer.kernels.fp8_quant import quantize_per_token_triton, w8a16_matmul

    rows = []
    gen = torch.Generator(device=device).manual_seed(1)
    w8a16_ms = sorted({1, w8a16_max_m, *(m for m in batch_sizes if m <= w8a16_max_m)} - {0})
    for name, k, n in LLAMA3_8B_SHAPES:
        w_q, w_scale = quantize_weight(torch.randn(n, k, device=device, generator=gen, dtype=torch.bfloat16) * 0.02)
        for m in batch_sizes:
            x = torch.randn(m, k, device=device, generator=gen, dtype=torch.bfloat16) * 4
            x_q, s = quantize_per_token_triton(x)
            ref_q, ref_s = quantize_per_token(x)
            bits = int((x_q.view(torch.uint8) != ref_q.view(torch.uint8)).sum())
            scales = int((s != ref_s).sum())
            rows.append({"kernel": "quantize_per_token", "shape": name, "m": m, "k": k, "fp8_mismatches": bits,
                         "scale_mismatches": scales, "ok": bits == 0 and scales == 0})
        for m in w8a16_ms:
            x = torch.randn(m, k, device=device, generator=gen, dtype=torch.bfloat16)
            y, ref = w8a16_matmul(x, w_q, w_scale).float(), w8a16_matmul_ref(x, w_q, w_scale).float()
            # a bf16 ulp is 2**-7 of the value's binade; values under 1/8 of the largest (sums that
            # cancel) are measured in the ulp at 1/8 of it
            binade = torch.floor(torch.log2(ref.abs().clamp(min=ref.abs().max().item() / 8)))
            err = ((y - ref).abs() / torch.exp2(binade - 7)).max().item()
            rows.append({"kernel": "w8a16", "shape": name, "m": m, "k": k, "n": n, "max_error_ulps": err,
                         "rel_max_error": ((y - ref).abs().max() / ref.abs().max()).item(), "ok": err <= 2})
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


def matmul_peaks(device: torch.device, n: int = 8192) -> dict:
    """FLOP/s of one large square GEMM in bf16 (torch.mm) and in FP8 (torch._scaled_mm): the peaks
    the prefill chunk is compared with, measured here rather than taken from a data sheet."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
    one = torch.ones((), device=device)
    runs = {"bf16": lambda: torch.mm(a, b),
            "fp8": lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)}
    peaks = {}
    for name, fn in runs.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        start, reps = time.perf_counter(), 20
        for _ in range(reps):
            fn()
        torch.cuda.synchronize(device)
        peaks[name] = 2 * n**3 * reps / (time.perf_counter() - start)
    return peaks


def time_steps(device: str, quantization: str | None, kv_cache_dtype: str, batch_sizes: list[int], context: int,
               bandwidth: float, chunk: int, model: str = "llama3-8b",
               label: str | None = None) -> tuple[list[dict], dict]:
    """Decode step times at each batch size beside their roofline, and one prefill chunk's time."""
    from tetriinfer import LLM
    from tetriinfer.engine.profiler import profile_steps

    blocks = max(batch_sizes) * (-(-(context + 1) // 16) + 1) + 64
    blocks = max(blocks, -(-chunk // 16) + 64)
    engine = LLM(model, device=device, dtype="bfloat16", quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                 num_blocks=blocks, max_num_seqs=max(batch_sizes), chunk_size=chunk,
                 enable_prefix_caching=False).engine
    weight_bytes = sum(p.nbytes for p in engine.runner.model.parameters())
    linear_params = sum(p.numel() for n, p in engine.runner.model.named_parameters()
                        if p.dim() == 2 and "embed" not in n)
    label = label or (quantization or "bf16") + ("+fp8kv" if kv_cache_dtype == "fp8" else "")
    try:
        times = profile_steps(engine, [chunk], [0], batch_sizes, [context], repeats=20)
    finally:
        engine.close()
    rows = []
    for b, (seconds,) in zip(batch_sizes, times.decode):
        step_bytes = weight_bytes + b * (context + 1) * engine.kv_bytes_per_token
        rows.append({"weights": label, "batch": b, "context": context, "step_ms": seconds * 1e3,
                     "roofline_ms": step_bytes / bandwidth * 1e3, "weight_gb": weight_bytes / 1e9})
    prefill_s = times.prefill[0][0]
    prefill = {"weights": label, "chunk": chunk, "ms": prefill_s * 1e3, "tokens_per_s": chunk / prefill_s,
               "linear_flops_per_s": 2 * linear_params * chunk / prefill_s}
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows, prefill


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128, 256])
    p.add_argument("--context", type=int, default=512, help="tokens per sequence before the decode step")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk tokens")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="engine configurations to time (default: all)")
    p.add_argument("--w8a16-max-m", type=int, default=16,
                   help="fp8-w8a16: batches of at most this many tokens take the W8A16 GEMM (<= 64)")
    p.add_argument("--gemv-max-m", type=int, default=1,
                   help="fp8-w8a16: batches of at most this many tokens take the W8A16 GEMV (<= 4)")
    p.add_argument("--gemm-ms", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 256],
                   help="token counts of the per-projection GEMM timing")
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

    triton_rows = check_triton_kernels(device, args.batch_sizes, args.w8a16_max_m)
    print("Triton kernels vs torch references (quantization bit for bit; W8A16 within 2 bf16 ulps):")
    for r in triton_rows:
        detail = (f"fp8 mismatches {r['fp8_mismatches']}, scale mismatches {r['scale_mismatches']}"
                  if r["kernel"] == "quantize_per_token" else
                  f"max error {r['max_error_ulps']:.2f} ulp, rel_max_error={r['rel_max_error']:.2e}")
        print(f"  {r['kernel']:<18} {r['shape']:<13} m={r['m']:<4} {detail} {'ok' if r['ok'] else 'FAIL'}")

    gemms = time_gemms(device, args.gemm_ms)
    print("one projection (us, CUDA graph, activations already quantized)")
    for r in gemms:
        print(f"  {r['shape']:<13} m={r['m']:<4} " + "  ".join(f"{k} {v:7.1f}" for k, v in r.items()
                                                            if k not in ("shape", "m")))
    bandwidth = copy_bandwidth(device)
    peaks = matmul_peaks(device)
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s; GEMM peaks: bf16 {peaks['bf16'] / 1e12:.0f}, "
          f"fp8 {peaks['fp8'] / 1e12:.0f} TFLOP/s")
    decode, prefill, errors = [], [], {}
    for label in args.variants:
        quantization, kv, act_quant, w8a16 = VARIANTS[label]
        saved = quant.ACT_QUANT, quant.W8A16_MAX_M, quant.GEMV_MAX_M, quant.TRITON_W8A8_MAX_M
        quant.ACT_QUANT, quant.W8A16_MAX_M = act_quant, args.w8a16_max_m if w8a16 else 0
        quant.GEMV_MAX_M = args.gemv_max_m if w8a16 else 0
        quant.TRITON_W8A8_MAX_M = saved[3] if w8a16 else 0
        try:
            rows, chunk = time_steps(args.device, quantization, kv, args.batch_sizes, args.context, bandwidth,
                                     args.chunk, label=label)
            decode += rows
            prefill.append(chunk)
            # As each variant ends, so a run cut short by a time limit still shows what it timed.
            print(f"  [{label}] decode " + ", ".join(f"b{r['batch']} {r['step_ms']:.2f} ms" for r in rows)
                  + f"; prefill {chunk['ms']:.2f} ms", flush=True)
        except Exception as e:  # record why, keep the rest of the run
            errors[label] = f"{type(e).__name__}: {e}"
        finally:
            quant.ACT_QUANT, quant.W8A16_MAX_M, quant.GEMV_MAX_M, quant.TRITON_W8A8_MAX_M = saved
    labels = [lab for lab in args.variants if any(r["weights"] == lab for r in decode)]
    print(f"llama3-8b decode step, context {args.context} per sequence (ms, and x the roofline = bytes read / "
          f"copy bandwidth)")
    print("  batch " + " ".join(f"{lab:>18}" for lab in labels))
    by = {(r["weights"], r["batch"]): r for r in decode}
    for b in args.batch_sizes:
        cells = [by[(lab, b)] for lab in labels]
        print(f"  {b:>5} " + " ".join(f"{c['step_ms']:>9.2f} ({c['step_ms'] / c['roofline_ms']:.2f}x)" for c in cells))
    print(f"prefill, one {args.chunk}-token chunk (linear-layer FLOP/s against the GEMM peak of its precision)")
    for r in prefill:
        peak = peaks["fp8" if r["weights"].startswith("fp8") else "bf16"]
        print(f"  {r['weights']:<14} {r['ms']:8.2f} ms {r['tokens_per_s']:9.0f} tok/s "
              f"{r['linear_flops_per_s'] / 1e12:6.0f} TFLOP/s = {r['linear_flops_per_s'] / peak:.2f} of peak")
    for what, err in errors.items():
        print(f"  {what}: {err}")

    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "host": platform.node(),
              "commit": os.environ.get("TETRIINFER_COMMIT", "unknown"), "copy_bandwidth_bytes_per_s": bandwidth,
              "matmul_peaks_flops_per_s": peaks, "kernel_check": kernel, "decode": decode, "prefill": prefill,
              "errors": errors, "triton_check": triton_rows, "w8a16_max_m": args.w8a16_max_m,
              "gemv_max_m": args.gemv_max_m, "gemms_us": gemms,
              "kernel_ok": all(r["ok"] for r in kernel + triton_rows)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if result["kernel_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
