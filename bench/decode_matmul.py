"""A decode step's projections alone: cuBLAS (`F.linear`) against the Triton split-K kernel of
`agents.decode_matmul` (by column block, K block and splits), at the Qwen2.5 shapes and decode
batches, as a share of the copy bandwidth measured in the same run. One call per layer, each layer
its own weights (as in a decode step, so they do not sit in L2), all layers in one CUDA graph.
"kernel" times the split-K kernel alone; "+ sum" adds the eager sum of its partials (in the engine
that sum would fuse into the next compiled kernel).

    python -m bench.decode_matmul [--shapes 0.5b:64,3b:128]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from agents.decode_matmul import split_k_partials
from bench.common import SHAPES, copy_bandwidth, table, time_cuda, write_results
from bench.decode_attention import graphed


def projections(shape: str) -> dict[str, tuple[int, int]]:
    """(N, K) of each decode projection: fused QKV, attention output, fused gate-up, down."""
    s = SHAPES[shape]
    hidden, heads, kv_heads, inter = s["hidden_size"], s["num_attention_heads"], s["num_key_value_heads"], \
        s["intermediate_size"]
    d = hidden // heads
    return {"qkv": ((heads + 2 * kv_heads) * d, hidden), "o": (hidden, heads * d), "gate_up": (2 * inter, hidden),
            "down": (hidden, inter)}


def configs(N: int, sms: int) -> list[tuple[int, int, int]]:
    """(block_n, block_k, splits) with between half a wave and eight waves of programs."""
    out = []
    for block_n in (32, 64, 128):
        for block_k in (64, 128):
            for splits in (1, 2, 4, 8, 16):
                if sms // 2 <= -(-N // block_n) * splits <= 8 * sms:
                    out.append((block_n, block_k, splits))
    return out


def run_shape(shape: str, batch: int, bandwidth: float, sms: int) -> list[dict]:
    layers = SHAPES[shape]["num_hidden_layers"]
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (N, K) in projections(shape).items():
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) * K ** -0.5
                   for _ in range(layers)]
        x = torch.randn(batch, K, device="cuda", dtype=torch.bfloat16, generator=g)
        expected = [F.linear(x, w).float() for w in weights]
        read = (N * K + batch * K) * 2  # weights and rows, bf16
        variants = {"cublas": (lambda: [F.linear(x, w) for w in weights], None)}
        for block_n, block_k, splits in configs(N, sms):
            kernel = (lambda block_n=block_n, block_k=block_k, splits=splits:
                      [split_k_partials(x, w, splits, block_n, block_k) for w in weights])
            summed = lambda kernel=kernel: [p.sum(0).to(torch.bfloat16) for p in kernel()]
            variants[f"n{block_n} k{block_k} s{splits}"] = (summed, kernel)
        for variant, (fn, kernel) in variants.items():
            err = max(float((a.float() - b).abs().max()) for a, b in zip(fn(), expected))
            sec = time_cuda(graphed(fn), repeats=20) / layers
            row = {"shape": shape, "batch": batch, "proj": name, "N": N, "K": K, "variant": variant,
                   "us": sec * 1e6, "pct_copy_bw": 100 * read / sec / bandwidth, "max_abs_diff": err}
            if kernel is not None:
                k_sec = time_cuda(graphed(kernel), repeats=20) / layers
                row.update(kernel_us=k_sec * 1e6, kernel_pct_copy_bw=100 * read / k_sec / bandwidth)
            rows.append(row)
        best = min((r for r in rows if r["proj"] == name and r["variant"] != "cublas"), key=lambda r: r["kernel_us"])
        base = next(r for r in rows if r["proj"] == name and r["variant"] == "cublas")
        print(f"{shape} {name}: cublas {base['us']:.2f} us; best split-K {best['variant']} {best['kernel_us']:.2f} us "
              f"(+ sum {best['us']:.2f})", flush=True)
        del weights
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="0.5b:64,3b:128", help="shape:batch pairs")
    args = p.parse_args()
    bandwidth = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for item in args.shapes.split(","):
        shape, batch = item.split(":")
        rows += run_shape(shape, int(batch), bandwidth, sms)
    best = {}
    for r in rows:
        key = (r["shape"], r["proj"], r["variant"] == "cublas")
        if key not in best or r.get("kernel_us", r["us"]) < best[key].get("kernel_us", best[key]["us"]):
            best[key] = r
    print(table(list(best.values()), ["shape", "batch", "proj", "N", "K", "variant", "us", "pct_copy_bw", "kernel_us",
                                      "kernel_pct_copy_bw", "max_abs_diff"]))
    print(f"wrote {write_results('decode_matmul', {'copy_bandwidth_Bps': bandwidth, 'rows': rows})}")


if __name__ == "__main__":
    main()
