"""FP8 GEMMs at decode batch sizes (not a test): does a Triton W8A8 GEMM (kernels.fp8_gemm) stream
llama3-8b's FP8 projections faster than torch._scaled_mm at 16 to 512 tokens, and at which launch
config? docs/benchmarks/gpu.md found cuBLAS's FP8 GEMMs there at 1.3-2.4 TB/s of a 3.0 TB/s H100.

    PYTHONPATH=. python scripts/w8a8_sweep.py --out sweep.json [--ms 16 32 64 128 256 512]

Paths, each timed by fp8_check.graph_us (200 launches in one CUDA graph), activations already
quantized (the quantization kernel is the same for every FP8 path):
- `bf16`: torch.mm on the bf16 weights;
- `fp8 rowwise`: torch._scaled_mm with per-token and per-channel scales (what the engine runs);
- `fp8 tensorwise`: torch._scaled_mm with one scale per operand (cuBLAS; needs a per-tensor
  activation scale, which the engine does not compute: for comparison only);
- `triton ...`: kernels.fp8_gemm.w8a8_matmul at every config of a grid, both operand orders.
Every W8A8 candidate is checked against model.quant.fp8_matmul_ref before it is timed (fp8_check.time_checked). Prints the best
config per shape and m and the TB/s of weights it reaches; writes every timing to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
sys.path.insert(0, str(Path(__file__).parent))  # fp8_check
from fp8_check import LLAMA3_8B_SHAPES, time_checked  # noqa: E402

from tetriinfer.kernels.fp8_gemm import w8a8_launch_config, w8a8_matmul  # noqa: E402
from tetriinfer.kernels.fp8_quant import W8A16_MAX_ROWS, quantize_per_token_triton, w8a16_matmul  # noqa: E402
from tetriinfer.model.quant import fp8_matmul_ref, fp8_matmul_scaled_mm, quantize_per_token, quantize_weight  # noqa: E402


def triton_configs(m: int, k: int) -> dict[str, dict]:
    """The shipped config, then the grid: swapped (tokens on the narrow side) up to 64-token tiles,
    plain from 64 tokens."""
    pow2 = max(16, 1 << (m - 1).bit_length())
    shipped = w8a8_launch_config(m, k)
    grid = {"triton shipped": shipped, "triton shipped, no promotion": {**shipped, "PROMOTE": False}}
    for bm, bn, bk, ns in itertools.product((16, 32, 64), (32, 64, 128), (128, 256), (3, 4)):
        if bm <= pow2:
            grid[f"triton swap m{bm} n{bn} k{bk} w4 s{ns}"] = dict(SWAP=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                                 num_warps=4, num_stages=ns)
    for bm, bn, nw, ns in itertools.product((64, 128), (64, 128), (4, 8), (3, 4)):
        if m >= 64 and bm <= pow2:
            grid[f"triton plain m{bm} n{bn} k128 w{nw} s{ns}"] = dict(SWAP=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128,
                                                                   num_warps=nw, num_stages=ns)
    return grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", type=int, nargs="+", default=[2, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows, best = [], []
    for name, k, n in LLAMA3_8B_SHAPES:
        w = torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02
        w_q, w_scale = quantize_weight(w)
        w_tensor_scale = w_scale.max().reshape(())
        w_q_tensor = (w.float() / w_tensor_scale).to(w_q.dtype)
        for m in args.ms:
            x = torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16)
            x_q, x_s = quantize_per_token(x)
            x_tensor_scale = x_s.max().reshape(())
            x_q_tensor = (x.float() / x_tensor_scale).to(x_q.dtype)
            ref = fp8_matmul_ref(x_q, x_s, w_q, w_scale, torch.float32)
            cands = {"bf16": lambda: x @ w.t(),
                     "fp8 rowwise": lambda: fp8_matmul_scaled_mm(x_q, x_s, w_q, w_scale, torch.bfloat16),
                     "fp8 tensorwise": lambda: torch._scaled_mm(x_q_tensor, w_q_tensor.t(), scale_a=x_tensor_scale,
                                                                scale_b=w_tensor_scale, out_dtype=torch.bfloat16)}
            if m <= W8A16_MAX_ROWS:  # the engine's path up to 16 tokens: no activation quantization
                cands["w8a16 shipped"] = lambda: w8a16_matmul(x, w_q, w_scale)
            cands["quantize"] = lambda: quantize_per_token_triton(x)
            for label, cfg in triton_configs(m, k).items():
                cands[label] = lambda cfg=cfg: w8a8_matmul(x_q, x_s, w_q, w_scale, torch.bfloat16, **cfg)
            checked = ("triton", "fp8 rowwise")  # tensor-wise rounds differently; bf16 and quantize are not W8A8
            timings = time_checked(cands, lambda label: ref if label.startswith(checked) else None)
            ok = {lab: t["us"] for lab, t in timings.items() if "us" in t}
            fastest = min((lab for lab in ok if lab.startswith("triton")), key=ok.get, default=None)
            rows.append({"shape": name, "m": m, "k": k, "n": n, "fastest_triton": fastest,
                         "us": {lab: round(t, 2) for lab, t in ok.items()},
                         "errors": {lab: t["error"] for lab, t in timings.items() if "error" in t}})
            nan = float("nan")
            tbs = (n * k) / (ok[fastest] * 1e6) if fastest else nan
            best.append(f"  {name:<13} m={m:<4} bf16 {ok.get('bf16', nan):6.1f}  rowwise {ok.get('fp8 rowwise', nan):6.1f}"
                        f"  tensorwise {ok.get('fp8 tensorwise', nan):6.1f}  w8a16 {ok.get('w8a16 shipped', nan):6.1f}"
                        f"  quant {ok.get('quantize', nan):4.1f}  shipped {ok.get('triton shipped', nan):6.1f}"
                        f"  triton {ok.get(fastest, nan):6.1f} us"
                        f" ({tbs:4.2f} TB/s) {fastest}")
            print(best[-1], flush=True)
            Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print("\n".join(["best per shape (us; TB/s of FP8 weights)"] + best))
    print("one config per m, by the sum over the shapes (us a layer):")
    for m in args.ms:
        at_m = [r for r in rows if r["m"] == m]
        labels = set.intersection(*(set(r["us"]) for r in at_m))
        sums = {lab: sum(r["us"][lab] for r in at_m) for lab in labels}
        ranked = sorted((lab for lab in sums if lab.startswith("triton")), key=sums.get)[:3]
        others = "  ".join(f"{lab} {sums[lab]:.1f}" for lab in ("bf16", "fp8 rowwise", "fp8 tensorwise", "w8a16 shipped",
                                                                 "quantize", "triton shipped",
                                                                 "triton shipped, no promotion") if lab in sums)
        print(f"  m={m:<4} {others}  best: " + ", ".join(f"{lab} {sums[lab]:.1f}" for lab in ranked))


if __name__ == "__main__":
    main()
