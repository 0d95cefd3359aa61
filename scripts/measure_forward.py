"""Measures a Llama-shaped forward pass on a CUDA GPU and writes it as a step-time profile.

A plain-torch reference, not the engine: 32 (or the preset's) decoder layers with their own random
bf16 weights, cuBLAS GEMMs, SDPA (flash) attention for prefill chunks over cached context, a batched
matmul attention for decode over a dense KV cache, RMSNorm, SwiGLU, the LM head and a greedy pick;
RoPE and the paged KV layout are left out. Each step is captured in a CUDA graph and replayed (as
vLLM-class engines run decode); the median of the replays is kept. The KV buffer is shared by all
layers: each layer still streams it from HBM (it is far larger than L2), so the bytes moved are a
real forward's while the memory needed stays small. It checks the roofline cost model
(docs/profile-format.md), and shows the profile format with real numbers.

Run on a GPU machine from the repo root:
    PYTHONPATH=. python scripts/measure_forward.py --model llama3-8b --gpu h100 --out profile.json
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from tetriinfer.presets import get_preset
from tetriinfer.sim.cost import RooflineCostModel
from tetriinfer.sim.profile import Grid2D, Profile, save_profile

CHUNK_TOKENS = [128, 256, 512, 1024, 2048, 4096]
CONTEXT_TOKENS = [0, 2048, 6144]
BATCH_SIZES = [1, 8, 32, 64, 128, 256]
CONTEXT_PER_SEQ = [128, 512, 1024, 2048, 4096]


class LlamaStack:
    def __init__(self, config: dict, device: torch.device) -> None:
        self.hidden = config["hidden_size"]
        self.heads = config["num_attention_heads"]
        self.kv_heads = config["num_key_value_heads"]
        self.head_dim = config.get("head_dim", self.hidden // self.heads)
        inter = config["intermediate_size"]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.q_size, self.kv_size = q_size, kv_size

        def weight(rows: int, cols: int) -> torch.Tensor:
            return torch.randn(rows, cols, device=device, dtype=torch.bfloat16) * rows**-0.5

        self.layers = [
            (weight(self.hidden, q_size + 2 * kv_size), weight(q_size, self.hidden),
             weight(self.hidden, 2 * inter), weight(inter, self.hidden))
            for _ in range(config["num_hidden_layers"])
        ]
        self.norm = torch.ones(self.hidden, device=device, dtype=torch.bfloat16)
        self.lm_head = weight(self.hidden, config["vocab_size"])

    def _mlp_and_residual(self, x, attn, w_o, w_gu, w_d):
        x = x + attn @ w_o
        gate, up = (F.rms_norm(x, (self.hidden,), self.norm) @ w_gu).chunk(2, dim=-1)
        return x + (F.silu(gate) * up) @ w_d

    def prefill(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context: int) -> torch.Tensor:
        """x: (n, hidden); caches: (1, kv_heads, context + n, head_dim), the first `context` cached."""
        n = x.shape[0]
        mask = causal_lower_right(n, context + n) if context else None
        for w_qkv, w_o, w_gu, w_d in self.layers:
            qkv = F.rms_norm(x, (self.hidden,), self.norm) @ w_qkv
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            k_cache[0, :, context:] = k.view(n, self.kv_heads, self.head_dim).transpose(0, 1)
            v_cache[0, :, context:] = v.view(n, self.kv_heads, self.head_dim).transpose(0, 1)
            q = q.view(1, n, self.heads, self.head_dim).transpose(1, 2)
            attn = F.scaled_dot_product_attention(
                q, k_cache, v_cache, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
            x = self._mlp_and_residual(x, attn.transpose(1, 2).reshape(n, self.q_size), w_o, w_gu, w_d)
        last = F.rms_norm(x[-1:], (self.hidden,), self.norm)
        return (last @ self.lm_head).argmax(dim=-1)

    def decode(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """x: (b, hidden); caches: (b, kv_heads, context, head_dim), the last slot for the new token."""
        b = x.shape[0]
        group = self.heads // self.kv_heads
        for w_qkv, w_o, w_gu, w_d in self.layers:
            qkv = F.rms_norm(x, (self.hidden,), self.norm) @ w_qkv
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            k_cache[:, :, -1] = k.view(b, self.kv_heads, self.head_dim)
            v_cache[:, :, -1] = v.view(b, self.kv_heads, self.head_dim)
            q = q.view(b, self.kv_heads, group, self.head_dim)
            scores = (q @ k_cache.transpose(-1, -2)).float() * self.head_dim**-0.5
            attn = torch.softmax(scores, dim=-1).to(torch.bfloat16) @ v_cache
            x = self._mlp_and_residual(x, attn.reshape(b, self.q_size), w_o, w_gu, w_d)
        return (F.rms_norm(x, (self.hidden,), self.norm) @ self.lm_head).argmax(dim=-1)


def time_graph(fn, replays: int = 15) -> float:
    """Median seconds of one replay of `fn` captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--gpu", default="h100", help="the sim/hardware.py key of this GPU, for the comparison")
    parser.add_argument("--out", required=True)
    parser.add_argument("--commit", default="unknown", help="recorded when the copy run has no git history")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    config = get_preset(args.model)
    stack = LlamaStack(config, device)
    roofline = RooflineCostModel.from_names(args.gpu, args.model)
    kv_shape = (stack.kv_heads, stack.head_dim)

    prefill = []
    for n in CHUNK_TOKENS:
        row = []
        for context in CONTEXT_TOKENS:
            x = torch.randn(n, stack.hidden, device=device, dtype=torch.bfloat16)
            k = torch.randn(1, kv_shape[0], context + n, kv_shape[1], device=device, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            row.append(round(time_graph(lambda: stack.prefill(x, k, v, context)), 7))
            print(f"prefill {n:5d} tokens, context {context:5d}: {row[-1] * 1e3:8.2f} ms "
                  f"(roofline {roofline.step_time(n, context, 0, 0) * 1e3:8.2f})", flush=True)
        prefill.append(tuple(row))
        torch.cuda.empty_cache()
    decode = []
    for b in BATCH_SIZES:
        row = []
        for context in CONTEXT_PER_SEQ:
            x = torch.randn(b, stack.hidden, device=device, dtype=torch.bfloat16)
            k = torch.randn(b, kv_shape[0], context, kv_shape[1], device=device, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            row.append(round(time_graph(lambda: stack.decode(x, k, v)), 7))
            print(f"decode {b:4d} seqs x {context:5d} context: {row[-1] * 1e3:8.2f} ms "
                  f"(roofline {roofline.step_time(0, 0, b, b * context) * 1e3:8.2f})", flush=True)
            del k, v
        decode.append(tuple(row))
        torch.cuda.empty_cache()

    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = git.stdout.strip() if git.returncode == 0 else args.commit
    profile = Profile(
        metadata={
            "device": torch.cuda.get_device_name(),
            "gpu": args.gpu,
            "model": args.model,
            "dtype": "bfloat16",
            "tensor_parallel": 1,
            "commit": commit,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "notes": "scripts/measure_forward.py: plain-torch reference forward in CUDA graphs, "
                     "median of 15 replays; not the engine. kv_capacity_tokens is the roofline's.",
        },
        kv_bytes_per_token=roofline.kv_bytes_per_token(),
        kv_capacity_tokens=roofline.kv_capacity_tokens(),
        prefill=Grid2D(tuple(CHUNK_TOKENS), tuple(CONTEXT_TOKENS), tuple(prefill)),
        decode=Grid2D(tuple(BATCH_SIZES), tuple(CONTEXT_PER_SEQ), tuple(decode)),
    )
    save_profile(profile, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
