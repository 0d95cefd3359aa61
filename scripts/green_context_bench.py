"""One GPU, prefill and decode at once: CUDA green contexts (one process, SM partitions) against
two plain streams (the GPU shares its SMs freely, as uncapped MPS does).

A Llama-3-8B-shaped stack of linear layers (random bf16 weights; attention left out, so this is
the weight-streaming and matmul part of a step): a decode step of `--decode-batch` tokens and a
prefill chunk of `--chunk` tokens. For each prefill SM share it reports the decode step time and
the prefill throughput while both run, against each alone on the whole GPU.

    python scripts/green_context_bench.py --out results.json [--shares 0.3,0.4,0.5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

HIDDEN, INTER, LAYERS, QKV = 4096, 14336, 32, 6144


def make_weights(device) -> list[list[torch.Tensor]]:
    shapes = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)]
    return [[torch.randn(s, device=device, dtype=torch.bfloat16) * 0.02 for s in shapes] for _ in range(LAYERS)]


def forward(x: torch.Tensor, weights) -> torch.Tensor:
    for qkv, o, gate_up, down in weights:
        h = x @ qkv.T
        x = x + h[:, :HIDDEN] @ o.T
        g = x @ gate_up.T
        x = x + (torch.nn.functional.silu(g[:, :INTER]) * g[:, INTER:]) @ down.T
    return x


def timed_loop(stream, x, weights, steps: int) -> list[torch.cuda.Event]:
    """Queue `steps` forward passes on `stream`, an event after each (and one before)."""
    events = [torch.cuda.Event(enable_timing=True)]
    with torch.cuda.stream(stream):
        events[0].record(stream)
        for _ in range(steps):
            forward(x, weights)
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record(stream)
    return events


def per_step_ms(events) -> float:
    return events[0].elapsed_time(events[-1]) / (len(events) - 1)


def run_pair(decode_stream, prefill_stream, xd, xp, weights, decode_steps: int, prefill_steps: int) -> dict:
    torch.cuda.synchronize()
    # Interleave the queuing so both streams have work from the start.
    pe = timed_loop(prefill_stream, xp, weights, prefill_steps)
    de = timed_loop(decode_stream, xd, weights, decode_steps)
    torch.cuda.synchronize()
    return {"decode_ms": per_step_ms(de), "prefill_ms": per_step_ms(pe)}


def green_streams(share: float):
    from torch.cuda.green_contexts import GreenContext

    total = torch.cuda.get_device_properties(0).multi_processor_count
    prefill_sms = max(8, int(total * share) // 8 * 8)
    decode_sms = max(8, (total - prefill_sms) // 8 * 8)
    contexts = (GreenContext.create(decode_sms, 0), GreenContext.create(prefill_sms, 0))
    streams = []
    for ctx in contexts:
        if hasattr(ctx, "Stream"):
            streams.append(ctx.Stream())
        else:  # older API: a stream made while the green context is current belongs to it
            ctx.make_current()
            streams.append(torch.cuda.Stream())
            ctx.pop_current()
    return contexts, streams, decode_sms, prefill_sms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shares", default="0.3,0.4,0.5", help="prefill SM shares to try")
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--decode-steps", type=int, default=60)
    parser.add_argument("--prefill-steps", type=int, default=12)
    args = parser.parse_args()
    device = torch.device("cuda:0")
    weights = make_weights(device)
    xd = torch.randn(args.decode_batch, HIDDEN, device=device, dtype=torch.bfloat16)
    xp = torch.randn(args.chunk, HIDDEN, device=device, dtype=torch.bfloat16)
    main_stream = torch.cuda.current_stream()
    for _ in range(3):  # warm up cuBLAS
        forward(xd, weights), forward(xp, weights)
    torch.cuda.synchronize()
    decode_events = timed_loop(main_stream, xd, weights, args.decode_steps)
    prefill_events = timed_loop(main_stream, xp, weights, args.prefill_steps)
    torch.cuda.synchronize()
    alone_decode, alone_prefill = per_step_ms(decode_events), per_step_ms(prefill_events)
    rows = [{"mode": "alone", "decode_ms": alone_decode, "prefill_ms": alone_prefill}]
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    rows.append({"mode": "two streams (shared SMs)", **run_pair(s1, s2, xd, xp, weights, args.decode_steps, args.prefill_steps)})
    error = None
    for share in (float(s) for s in args.shares.split(",")):
        try:
            contexts, (ds, ps), dsms, psms = green_streams(share)
            run_pair(ds, ps, xd, xp, weights, 4, 1)  # warm up on the partitions
            row = run_pair(ds, ps, xd, xp, weights, args.decode_steps, args.prefill_steps)
            rows.append({"mode": f"green contexts, prefill {psms} SMs / decode {dsms} SMs", "prefill_share": share, **row})
            del contexts
        except Exception as e:  # noqa: BLE001 - report what the platform lacks, keep the other rows
            error = f"{type(e).__name__}: {e}"
            break
    for row in rows:
        row["decode_slowdown"] = row["decode_ms"] / alone_decode
        row["prefill_throughput_fraction"] = alone_prefill / row["prefill_ms"]
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "time": time.time(),
              "decode_batch": args.decode_batch, "chunk": args.chunk, "rows": rows, "green_context_error": error}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"| mode | decode step ms | x alone | prefill chunk ms | prefill throughput |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['decode_ms']:.2f} | {r['decode_slowdown']:.2f} | {r['prefill_ms']:.1f} | "
              f"{r['prefill_throughput_fraction']:.2f} |")
    if error:
        print("green contexts failed:", error)


if __name__ == "__main__":
    main()
