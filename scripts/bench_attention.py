"""Attention kernel on a CUDA GPU (not a test; for tuning tetriinfer/kernels/attention_launch.py).

Decode (default): time per layer against batch and context, for the split count paged_attention
picks and for a sweep of forced ones (tunes PROGRAMS_PER_SM and MIN_SPLIT_TOKENS).
`--prefill`: one prompt chunk over its cached context, for a sweep of tile shapes (tunes
choose_tiles), against PyTorch's SDPA (flash attention) where there is no cached context.
`--decode-tiles`: decode attention for a sweep of tile shapes, each with its chosen split count.

    PYTHONPATH=. python scripts/bench_attention.py --out attention.json --plot attention.png
    PYTHONPATH=. python scripts/bench_attention.py --prefill --out prefill-tiles.json

Llama-3-8B shapes by default (32 query heads, 8 KV heads, head_dim 128, bf16, 16-token pages), one
token per sequence, pages scattered over the cache. Each layer has its own cache and enough layers
run in one CUDA graph that their caches together far exceed L2, so every layer streams its K/V from
HBM as in a real forward. Reports microseconds per layer and the K/V read bandwidth (bytes of the
batch's K and V over that time).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from measure_forward import time_graph  # noqa: E402

from tetriinfer.kernels import attention_launch, attention_triton  # noqa: E402

STREAMED_BYTES = 512 << 20  # K/V per graph replay, about 10x the H100's L2
MAX_LAYERS = 64


def decode_inputs(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, page: int,
                  layers: int, device: str, gen: torch.Generator) -> dict:
    """Random decode inputs; every sequence has `context` tokens, its pages a random subset of the cache."""
    pages_per_seq = -(-context // page)
    num_blocks = batch * pages_per_seq
    block_tables = torch.randperm(num_blocks, generator=gen).view(batch, pages_per_seq).to(torch.int32)
    shape = (num_blocks, page, kv_heads, head_dim)
    caches = [(torch.randn(shape, device=device, dtype=torch.bfloat16),
               torch.randn(shape, device=device, dtype=torch.bfloat16)) for _ in range(layers)]
    return dict(
        q=torch.randn(batch, heads, head_dim, device=device, dtype=torch.bfloat16),
        caches=caches,
        block_tables=block_tables.to(device),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
    )


def time_layer(inputs: dict, head_dim: int, max_seq_len: int, num_kv_splits: int | None,
               tiles: attention_launch.TileConfig | None = None) -> float:
    """Median seconds of one layer's decode attention, over a graph of all layers."""
    out = torch.empty_like(inputs["q"])

    def forward() -> None:
        for k_cache, v_cache in inputs["caches"]:
            attention_triton.paged_attention(
                inputs["q"], k_cache, v_cache, inputs["block_tables"], inputs["query_start_loc"],
                inputs["seq_lens"], head_dim**-0.5, out, max_seq_len=max_seq_len, num_kv_splits=num_kv_splits,
                tiles=tiles,
            )

    return time_graph(forward) / len(inputs["caches"])


def prefill_tiles(chunk: int, contexts: list[int], heads: int, kv_heads: int, head_dim: int, page: int) -> list[dict]:
    """Microseconds per layer of one `chunk`-token prompt piece over `context` cached tokens, per tile shape."""
    device, gen = torch.device("cuda"), torch.Generator().manual_seed(0)
    group = heads // kv_heads
    default = attention_launch.choose_tiles(False, head_dim, group, torch.bfloat16)
    candidates = {default} | {attention_launch.TileConfig(m, n, w, st) for m in (64, 128) for n in (32, 64, 128)
                              for w in (4, 8) for st in (2, 3, 4)}
    rows = []
    for context in contexts:
        total = context + chunk
        pages = -(-total // page)
        layers = max(1, min(MAX_LAYERS, -(-STREAMED_BYTES // (2 * total * kv_heads * head_dim * 2))))
        shape = (pages, page, kv_heads, head_dim)
        caches = [(torch.randn(shape, device=device, dtype=torch.bfloat16),
                   torch.randn(shape, device=device, dtype=torch.bfloat16)) for _ in range(layers)]
        q = torch.randn(chunk, heads, head_dim, device=device, dtype=torch.bfloat16)
        block_tables = torch.randperm(pages, generator=gen).to(torch.int32).view(1, pages).to(device)
        qsl = torch.tensor([0, chunk], dtype=torch.int32, device=device)
        seq_lens = torch.tensor([total], dtype=torch.int32, device=device)
        out = torch.empty_like(q)
        run = lambda tiles: [attention_triton.paged_attention(  # noqa: E731
            q, k, v, block_tables, qsl, seq_lens, head_dim**-0.5, out, tiles=tiles) for k, v in caches]
        run(default)
        expected = out.clone()
        for tiles in tqdm(sorted(candidates, key=str), desc=f"prefill tiles, context {context}"):
            try:
                seconds = time_graph(lambda t=tiles: run(t)) / layers
                error = (out.float() - expected.float()).abs().max().item()
            except Exception as e:  # a shape that does not fit the SM's shared memory or registers
                rows.append(dict(context=context, tiles=vars(tiles), error=f"{type(e).__name__}: {e}"[:200]))
                continue
            rows.append(dict(context=context, tiles=vars(tiles), default=tiles == default, us_per_layer=1e6 * seconds,
                             max_abs_diff_vs_default=error))
        if context == 0:  # the dense reference: flash attention over contiguous K/V
            k = torch.randn(1, kv_heads, chunk, head_dim, device=device, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            qd = q.transpose(0, 1).unsqueeze(0)
            seconds = time_graph(lambda: [torch.nn.functional.scaled_dot_product_attention(
                qd, k, v, is_causal=True, enable_gqa=True) for _ in range(layers)]) / layers
            rows.append(dict(context=context, tiles="sdpa", us_per_layer=1e6 * seconds))
        del caches
        torch.cuda.empty_cache()
    return rows


def decode_tiles(batches: list[int], contexts: list[int], heads: int, kv_heads: int, head_dim: int,
                 page: int) -> list[dict]:
    """Microseconds per layer of decode attention per tile shape, each with the split count chosen for it."""
    device, gen = torch.device("cuda"), torch.Generator().manual_seed(0)
    default = attention_launch.choose_tiles(True, head_dim, heads // kv_heads, torch.bfloat16)
    candidates = {default} | {attention_launch.TileConfig(16, n, w, st) for n in (16, 32, 64, 128)
                              for w in (2, 4, 8) for st in (2, 3, 4, 5)}
    rows = []
    for context in contexts:
        for batch in batches:
            layer_bytes = 2 * batch * context * kv_heads * head_dim * 2
            layers = max(1, min(MAX_LAYERS, -(-STREAMED_BYTES // layer_bytes)))
            inputs = decode_inputs(batch, context, heads, kv_heads, head_dim, page, layers, "cuda", gen)
            for tiles in tqdm(sorted(candidates, key=str), desc=f"decode tiles, batch {batch}, context {context}"):
                try:
                    seconds = time_layer(inputs, head_dim, context, None, tiles)
                except Exception as e:  # a shape that does not fit the SM's shared memory or registers
                    rows.append(dict(batch=batch, context=context, tiles=vars(tiles), error=f"{type(e).__name__}: {e}"[:200]))
                    continue
                rows.append(dict(batch=batch, context=context, tiles=vars(tiles), default=tiles == default,
                                 us_per_layer=1e6 * seconds, kv_gb_per_s=layer_bytes / seconds / 1e9))
            del inputs
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", action="store_true", help="sweep prefill tile shapes instead of decode splits")
    ap.add_argument("--decode-tiles", action="store_true", help="sweep decode tile shapes instead of decode splits")
    ap.add_argument("--chunk", type=int, default=2048, help="--prefill: prompt tokens in the chunk")
    ap.add_argument("--prefill-contexts", type=int, nargs="+", default=[0, 2048], help="--prefill: cached tokens")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128, 256])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="forced split counts")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("attention.json"))
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU", file=sys.stderr)
        return 1

    if args.prefill:
        contexts = args.prefill_contexts
        rows = prefill_tiles(args.chunk, contexts, args.heads, args.kv_heads, args.head_dim, args.page)
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), chunk=args.chunk, rows=rows), indent=1))
        for context in contexts:
            ok = sorted((r for r in rows if r["context"] == context and "us_per_layer" in r), key=lambda r: r["us_per_layer"])
            print(f"chunk {args.chunk}, context {context}: fastest first")
            for r in ok[:8] + [r for r in ok[8:] if r.get("default") or r["tiles"] == "sdpa"]:
                print(f"  {str(r['tiles']):<70} {r['us_per_layer']:8.1f} us{'  (default)' if r.get('default') else ''}")
        return 0

    if args.decode_tiles:
        rows = decode_tiles(args.batches, args.contexts, args.heads, args.kv_heads, args.head_dim, args.page)
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
        for context in args.contexts:
            for batch in args.batches:
                ok = sorted((r for r in rows if (r["batch"], r["context"]) == (batch, context) and "us_per_layer" in r),
                            key=lambda r: r["us_per_layer"])
                print(f"decode batch {batch}, context {context}: fastest first")
                for r in ok[:5] + [r for r in ok[5:] if r["default"]]:
                    print(f"  {str(r['tiles']):<70} {r['us_per_layer']:8.1f} us {r['kv_gb_per_s']:6.0f} GB/s"
                          f"{'  (default)' if r['default'] else ''}")
        return 0

    gen = torch.Generator().manual_seed(0)
    device = torch.device("cuda")
    rows = []
    for context in args.contexts:
        for batch in tqdm(args.batches, desc=f"context {context}"):
            layer_bytes = 2 * batch * context * args.kv_heads * args.head_dim * 2
            layers = max(1, min(MAX_LAYERS, -(-STREAMED_BYTES // layer_bytes)))
            inputs = decode_inputs(batch, context, args.heads, args.kv_heads, args.head_dim, args.page, layers,
                                   "cuda", gen)
            auto = attention_launch.choose_num_kv_splits(batch, args.kv_heads, context,
                                                        attention_launch.num_sms(device))
            for splits in sorted(set(args.splits) | {auto}):
                seconds = time_layer(inputs, args.head_dim, context, splits)
                rows.append(dict(batch=batch, context=context, splits=splits, chosen=splits == auto,
                                 us_per_layer=1e6 * seconds, kv_gb_per_s=layer_bytes / seconds / 1e9))
            del inputs
            torch.cuda.empty_cache()

    shapes = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, page=args.page, dtype="bfloat16")
    report = dict(device=torch.cuda.get_device_name(), shapes=shapes, rows=rows)
    args.out.write_text(json.dumps(report, indent=1))
    header = ("context", "batch", "chosen", "us", "GB/s", "1 split us", "best", "best us")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (7, 5, 6, 8, 6, 10, 5, 8))))
    for context in args.contexts:
        for batch in args.batches:
            points = [r for r in rows if r["batch"] == batch and r["context"] == context]
            chosen = next(r for r in points if r["chosen"])
            single = next(r for r in points if r["splits"] == 1)
            best = min(points, key=lambda r: r["us_per_layer"])
            print(f"{context:>7} {batch:>5} {chosen['splits']:>6} {chosen['us_per_layer']:>8.1f} "
                  f"{chosen['kv_gb_per_s']:>6.0f} {single['us_per_layer']:>10.1f} {best['splits']:>5} "
                  f"{best['us_per_layer']:>8.1f}")
    if args.plot:
        plot(rows, args.contexts, args.batches, args.plot)
    return 0


def plot(rows: list[dict], contexts: list[int], batches: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        for label, pick in (("chosen split", lambda r: r["chosen"]), ("1 split", lambda r: r["splits"] == 1)):
            points = [r for r in rows if r["context"] == context and pick(r)]
            ax.plot([r["batch"] for r in points], [r["kv_gb_per_s"] for r in points], marker="o", label=label)
        best = [max((r for r in rows if r["context"] == context and r["batch"] == b), key=lambda r: r["kv_gb_per_s"])
                for b in batches]
        ax.plot(batches, [r["kv_gb_per_s"] for r in best], linestyle="--", label="best forced split")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch (decode sequences)", ylabel="K/V read GB/s", title=f"context {context}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
