"""x @ w.T for the few rows of a decode step as a Triton kernel that splits the reduction (split-K):
with 64 rows a projection's output has too few tiles to keep every SM streaming weights, so each
program reads one slice of K for one block of output columns, and the slices' float32 partial sums
are added afterwards (in the caller's compiled graph, where that sum fuses with what follows).

The weights are read once, in row order, as `nn.Linear` stores them. On CPU, or without Triton,
`F.linear` runs instead."""

from __future__ import annotations

import torch

from agents.decode_attention import available  # noqa: F401  (the same test: CUDA, or Triton's interpreter)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs
    triton = None


if triton is not None:
    @triton.jit
    def _split_k_matmul(x_ptr, w_ptr, out_ptr, M, N, K, k_per_split, stride_xm, stride_wn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        """Program (column block j, split s): out[s, :, j-block] = x[:, slice s] @ w[j-block, slice s].T
        in float32, for all M rows at once (M <= BLOCK_M)."""
        j, s = tl.program_id(0), tl.program_id(1)
        m = tl.arange(0, BLOCK_M)
        n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        start = s * k_per_split
        end = tl.minimum(start + k_per_split, K)
        for k in range(start, end, BLOCK_K):
            at = k + kk
            x = tl.load(x_ptr + m[:, None] * stride_xm + at[None, :], mask=(m[:, None] < M) & (at[None, :] < end),
                        other=0.0)
            w = tl.load(w_ptr + n[:, None] * stride_wn + at[None, :], mask=(n[:, None] < N) & (at[None, :] < end),
                        other=0.0)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        tl.store(out_ptr + s * M * N + m[:, None] * N + n[None, :], acc, mask=(m[:, None] < M) & (n[None, :] < N))


def split_k_partials(x: torch.Tensor, w: torch.Tensor, splits: int, block_n: int = 64, block_k: int = 128,
                     warps: int = 4, stages: int = 3) -> torch.Tensor:
    """Float32 partial products (splits, M, N) of x (M, K) @ w (N, K).T over `splits` slices of K
    (multiples of block_k); their sum over the first dimension is the product."""
    M, K = x.shape
    N = w.shape[0]
    if x.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError("split_k_partials needs x and w contiguous in their last dimension")
    block_m = max(16, triton.next_power_of_2(M))
    if block_m > 128:
        raise ValueError(f"split_k_partials is for decode batches of at most 128 rows, got {M}")
    k_per_split = -(-K // (splits * block_k)) * block_k
    splits = -(-K // k_per_split)  # no empty split
    out = torch.empty(splits, M, N, device=x.device, dtype=torch.float32)
    _split_k_matmul[(triton.cdiv(N, block_n), splits)](
        x, w, out, M, N, K, k_per_split, x.stride(0), w.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, IEEE=x.dtype == torch.float32, num_warps=warps, num_stages=stages)
    return out
