"""Decode GEMMs with FP8 weights at a few tokens (not a test): which launch of which kernel streams
llama3-8b's FP8 projections nearest the copy bandwidth? docs/benchmarks/gpu.md found cuBLAS's FP8
GEMMs at m = 1 far from it (qkv 25 MB in 19 us) and each call costing at least ~13 us.

    PYTHONPATH=. python scripts/w8a16_sweep.py --out sweep.json [--ms 1 16]

Paths, each timed by fp8_check.graph_us (200 launches in one CUDA graph, launch overhead left out):
- `bf16`: torch.mm on the bf16 weights; `fp8`: quantized activations through torch._scaled_mm;
- `w8a16`: kernels.fp8_quant's W8A16 GEMM at its shipped launch config and at every config of a grid;
- `gemv`: kernels.fp8_quant.w8a16_gemv over a grid of configs, for M <= 4: no tensor cores, each
  program multiplies BLOCK_N weight rows by the tokens and reduces along K, optionally split over
  SPLIT_K programs whose float32 partials are summed by atomics (the buffer zeroed in the graph).
Every candidate is checked against model.quant.w8a16_matmul_ref before it is timed. Prints the best
config per shape and m, and the GB/s it reaches; writes every timing to --out.
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

from tetriinfer.kernels.fp8_quant import GEMV_MAX_ROWS, w8a16_gemv, w8a16_matmul  # noqa: E402
from tetriinfer.model.quant import (fp8_matmul_ref, fp8_matmul_scaled_mm, quantize_per_token, quantize_weight,  # noqa: E402
                                    w8a16_matmul_ref)

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows, best = [], []
    for name, k, n in LLAMA3_8B_SHAPES:
        w = torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02
        w_q, w_scale = quantize_weight(w)
        for m in args.ms:
            x = torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16)
            x_q, x_s = quantize_per_token(x)
            ref = w8a16_matmul_ref(x, w_q, w_scale).float()
            ref_w8a8 = fp8_matmul_ref(x_q, x_s, w_q, w_scale, torch.float32)
            cands = {"bf16": lambda: x @ w.t(),
                     "fp8": lambda: fp8_matmul_scaled_mm(x_q, x_s, w_q, w_scale, torch.bfloat16),
                     "w8a16 shipped": lambda: w8a16_matmul(x, w_q, w_scale)}
            for bn, bk, nw, ns in itertools.product((16, 32, 64), (256, 512), (4, 8), (4,)):
                cands[f"w8a16 n{bn} k{bk} w{nw} s{ns}"] = (
                    lambda bn=bn, bk=bk, nw=nw, ns=ns: w8a16_matmul(x, w_q, w_scale, BLOCK_N=bn, BLOCK_K=bk,
                                                                    num_warps=nw, num_stages=ns))
            if m <= GEMV_MAX_ROWS:
                for bn, bk, sk, nw in itertools.product((8, 16, 32), (512, 1024), (1, 2, 4), (4, 8)):
                    cands[f"gemv n{bn} k{bk} split{sk} w{nw}"] = (
                        lambda bn=bn, bk=bk, sk=sk, nw=nw: w8a16_gemv(x, w_q, w_scale, split_k=sk, BLOCK_N=bn, BLOCK_K=bk,
                                                              num_warps=nw, num_stages=3))
            # bf16 multiplies the unquantized weights; fp8 also rounds the activations
            timings = time_checked(cands, lambda label: None if label == "bf16" else ref_w8a8 if label == "fp8" else ref)
            ok = {lab: t["us"] for lab, t in timings.items() if "us" in t}
            fastest = min((lab for lab in ok if lab.startswith(("w8a16 n", "gemv"))), key=ok.get, default=None)
            row = {"shape": name, "m": m, "k": k, "n": n, "timings": timings, "fastest_kernel": fastest}
            rows.append(row)
            gbs = (n * k) / (ok[fastest] * 1e3) if fastest else float("nan")
            best.append(f"  {name:<13} m={m:<3} bf16 {ok.get('bf16', float('nan')):6.1f}  fp8 {ok.get('fp8', float('nan')):6.1f}"
                        f"  w8a16 shipped {ok.get('w8a16 shipped', float('nan')):6.1f}  best {ok.get(fastest, float('nan')):6.1f} us"
                        f" ({gbs:5.0f} GB/s) {fastest}")
            print(best[-1], flush=True)
            Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print("\n".join(["best per shape (us; GB/s of FP8 weights)"] + best))


if __name__ == "__main__":
    main()
