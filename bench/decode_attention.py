"""Decode-step attention alone: the Triton split-KV kernel (by splits and block size) against the
two batched matmuls over the bucketed length, at the Qwen2.5 shapes' heads, as a share of the copy
bandwidth measured in the same run. One call per layer, each layer its own cache (as in a decode
step, so the caches do not sit in L2), all layers in one CUDA graph.

    python -m bench.decode_attention [--shapes 0.5b:64,3b:128] [--kv 256:512]
"""

from __future__ import annotations

import argparse
import math

import torch

from agents.decode_attention import decode_attention
from agents.fast_model import matmul_decode_attention
from bench.common import copy_bandwidth, table, time_cuda, write_results

SHAPES = {"0.5b": (24, 14, 2, 64), "1.5b": (28, 12, 2, 128), "3b": (36, 16, 2, 128)}  # layers, heads, kv heads, d


def graphed(fn):
    """fn captured as a CUDA graph (after a warm-up that compiles): returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run_shape(shape: str, batch: int, low: int, high: int, bandwidth: float) -> list[dict]:
    layers, heads, kv_heads, d = SHAPES[shape]
    kv_len = 256 * math.ceil((high + 1) / 256)  # the engine's bucketed attention length
    g = torch.Generator(device="cuda").manual_seed(0)
    caches = [[torch.randn(batch, kv_heads, kv_len + 64, d, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(2)] for _ in range(layers)]
    q = torch.randn(batch, heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
    positions = torch.randint(low, high, (batch,), device="cuda", generator=g)
    read = 2 * layers * kv_heads * d * 2 * float((positions + 1).sum())  # filled K and V, bf16
    hidden_mask = (torch.arange(kv_len, device="cuda")[None] > positions[:, None])[:, None, None, None]

    def matmul():
        return [matmul_decode_attention(q[:, None], kc[:, :, :kv_len], vc[:, :, :kv_len], hidden_mask)
                for kc, vc in caches]

    variants = {"matmul": torch.compile(matmul, dynamic=False)}
    for block, warps, stages, splits in [(64, 4, 3, None), (64, 4, 3, 2), (32, 4, 3, 1), (128, 4, 3, 1),
                                         (64, 2, 3, 1), (64, 2, 2, 1), (64, 4, 2, 1), (64, 4, 4, 1), (128, 8, 3, 1),
                                         (128, 4, 2, 1)]:
        variants[f"triton b{block} w{warps} st{stages} s{splits or 'auto'}"] = (
            lambda block=block, warps=warps, stages=stages, splits=splits:
            [decode_attention(q, kc, vc, positions, kv_len, splits, block, warps, stages) for kc, vc in caches])
    expected = torch.stack([matmul_decode_attention(q[:, None], kc[:, :, :kv_len], vc[:, :, :kv_len], hidden_mask)
                            for kc, vc in caches]).float()
    rows = []
    for name, fn in variants.items():
        err = float((torch.stack(fn()).float() - expected).abs().max())
        sec = time_cuda(graphed(fn), repeats=20) / layers
        rows.append({"shape": shape, "batch": batch, "kv": f"{low}-{high}", "variant": name, "us_per_layer": sec * 1e6,
                     "GB_s": read / layers / sec / 1e9, "pct_copy_bw": 100 * read / layers / sec / bandwidth,
                     "max_abs_diff_vs_matmul": err})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="0.5b:64,3b:128", help="shape:batch pairs")
    p.add_argument("--kv", default="256:512", help="rows' filled lengths, uniform in [low, high)")
    args = p.parse_args()
    bandwidth = copy_bandwidth()
    low, high = map(int, args.kv.split(":"))
    rows = []
    for item in args.shapes.split(","):
        shape, batch = item.split(":")
        rows += run_shape(shape, int(batch), low, high, bandwidth)
    print(table(rows, ["shape", "batch", "kv", "variant", "us_per_layer", "GB_s", "pct_copy_bw",
                       "max_abs_diff_vs_matmul"]))
    print(f"wrote {write_results('decode_attention', {'copy_bandwidth_Bps': bandwidth, 'rows': rows})}")


if __name__ == "__main__":
    main()
