"""Decode attention over a bf16 vs an FP8 KV cache on a CUDA GPU (not a test): time per layer,
effective K/V bandwidth, and tile / dot-dtype variants (a float16 query selects the float16 dot).
Llama-3-8B's heads (32 query, 8 KV, 128 wide), 16-token pages, CUDA graphs of 20 launches.

    python3 scripts/bench_attention_fp8.py OUT.json
"""
import json, sys, torch, triton
from tetriinfer.kernels.attention_triton import paged_attention
from tetriinfer.kernels.attention_launch import TileConfig

FP8 = torch.float8_e4m3fn
H, KVH, D, PAGE = 32, 8, 128, 16
dev = "cuda"
torch.manual_seed(0)


def case(batch, ctx):
    nblk = ctx // PAGE
    total = batch * nblk + 1
    k = torch.randn(total, PAGE, KVH, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    bt = torch.randperm(total - 1, device=dev)[: batch * nblk].view(batch, nblk).int()
    q = torch.randn(batch, H, D, device=dev, dtype=torch.bfloat16)
    qsl = torch.arange(batch + 1, device=dev, dtype=torch.int32)
    sl = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
    return q, k, v, bt, qsl, sl


def timed(fn, reps=20):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay(); torch.cuda.synchronize()
    best = 1e9
    for _ in range(5):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); g.replay(); b.record(); b.synchronize()
        best = min(best, a.elapsed_time(b) / reps)
    return best * 1e3  # us


TILES = [None, TileConfig(16, 64, 4, 2), TileConfig(16, 128, 8, 2), TileConfig(16, 256, 4, 2)]
rows = []
for batch, ctx in [(1, 512), (32, 512), (256, 512), (64, 4096)]:
    q, k, v, bt, qsl, sl = case(batch, ctx)
    k8, v8 = k.to(FP8), v.to(FP8)
    nbytes16 = batch * ctx * KVH * D * 2 * 2
    ref = paged_attention(q, k8, v8, bt, qsl, sl, D ** -0.5, max_seq_len=ctx)
    for cache, (kc, vc), nbytes in (("bf16", (k, v), nbytes16), ("fp8", (k8, v8), nbytes16 // 2)):
        for qdt in ((torch.bfloat16,) if cache == "bf16" else (torch.bfloat16, torch.float16)):
            qq = q.to(qdt)
            for tiles in (TILES[:1] if cache == "bf16" else TILES):
                name = "default" if tiles is None else f"{tiles.block_n}n{tiles.num_warps}w{tiles.num_stages}s"
                try:
                    out = paged_attention(qq, kc, vc, bt, qsl, sl, D ** -0.5, max_seq_len=ctx, tiles=tiles)
                    err = (out.float() - ref.float()).abs().max().item() if cache == "fp8" else None
                    us = timed(lambda: paged_attention(qq, kc, vc, bt, qsl, sl, D ** -0.5, max_seq_len=ctx, tiles=tiles))
                except Exception as e:  # noqa
                    print("fail", batch, ctx, cache, qdt, name, repr(e)[:200]); continue
                r = dict(batch=batch, ctx=ctx, cache=cache, q=str(qdt)[6:], tiles=name, us=round(us, 1),
                         tbps=round(nbytes / us / 1e6, 2), max_err_vs_fp8_default=err)
                rows.append(r); print(r, flush=True)
json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), open(sys.argv[1], "w"), indent=1)
print("\n| batch | ctx | bf16 cache us (TB/s) | fp8 default us (TB/s) | best fp8 variant |")
for batch, ctx in sorted({(r["batch"], r["ctx"]) for r in rows}):
    rs = [r for r in rows if (r["batch"], r["ctx"]) == (batch, ctx)]
    b16 = [r for r in rs if r["cache"] == "bf16"]; d8 = [r for r in rs if r["cache"] == "fp8" and r["tiles"] == "default" and r["q"] == "bfloat16"]
    best = min((r for r in rs if r["cache"] == "fp8"), key=lambda r: r["us"])
    f = lambda r: f"{r['us']} ({r['tbps']})" if r else "-"
    print(f"| {batch} | {ctx} | {f(b16[0] if b16 else None)} | {f(d8[0] if d8 else None)} | {best['q']} {best['tiles']} {f(best)} |")
