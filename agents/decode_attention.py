"""Grouped-query attention for one decode step as a Triton kernel (split-KV, "flash-decoding"):
each program reads one KV head's keys and values of one row once, over a slice of that row's
filled length only, for all the query heads that share them; a second kernel merges the slices.

The matmul path it replaces (`decoder_layer`'s Lq == 1 branch) reads the whole bucketed cache
length twice (scores, then values) and writes the scores out between. On CPU, or without Triton,
that path runs instead."""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the matmul path runs
    triton = None


def available(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: a CUDA GPU with Triton, or any device under Triton's
    CPU interpreter (TRITON_INTERPRET=1 before Triton is imported; the tests set it)."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
    @triton.jit
    def _split_kv_attention(q_ptr, k_ptr, v_ptr, pos_ptr, dst_ptr, part_ptr, max_ptr, sum_ptr,
                            stride_qn, stride_qh, stride_kn, stride_kh, stride_kt, stride_vn, stride_vh, stride_vt,
                            kv_len, chunk, SPLITS: tl.constexpr, SCALE: tl.constexpr, GROUP: tl.constexpr,
                            GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr):
        """Program (row n, KV head h, split s): softmax attention of the GROUP query heads of h over
        keys [s * chunk, min((s + 1) * chunk, length)), length = min(pos[n] + 1, kv_len), online
        (running max and sum of exponentials, float32). One split writes the output; several write
        their unnormalised outputs, maxima and sums for `_merge_splits`."""
        n, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.minimum(tl.load(pos_ptr + n) + 1, kv_len)
        start = s * chunk
        end = tl.minimum(start + chunk, length)
        g, d, t = tl.arange(0, GROUP_PAD), tl.arange(0, D), tl.arange(0, BLOCK)
        heads = h * GROUP + g
        keep = g < GROUP
        q = tl.load(q_ptr + n * stride_qn + heads[:, None] * stride_qh + d[None, :], mask=keep[:, None], other=0.0)
        k_row, v_row = k_ptr + n * stride_kn + h * stride_kh, v_ptr + n * stride_vn + h * stride_vh
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.full([GROUP_PAD], 0.0, tl.float32)
        acc = tl.full([GROUP_PAD, D], 0.0, tl.float32)
        for b in range(start, end, BLOCK):
            idx = b + t
            valid = idx < end
            k = tl.load(k_row + idx[:, None] * stride_kt + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(valid[None, :], scores * SCALE, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_row + idx[:, None] * stride_vt + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        row_head = n * tl.num_programs(1) * GROUP + heads  # (N, heads) order
        if SPLITS == 1:
            out = acc / l_i[:, None]
            tl.store(dst_ptr + row_head[:, None] * D + d[None, :], out.to(dst_ptr.dtype.element_ty), mask=keep[:, None])
        else:
            at = row_head * SPLITS + s
            tl.store(part_ptr + at[:, None] * D + d[None, :], acc, mask=keep[:, None])
            tl.store(max_ptr + at, m_i, mask=keep)
            tl.store(sum_ptr + at, l_i, mask=keep)

    @triton.jit
    def _merge_splits(part_ptr, max_ptr, sum_ptr, dst_ptr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                      D: tl.constexpr):
        """Program (row, head): the splits' outputs, each weighted by exp(its max - the overall max)
        (an empty split weighs 0), over the weighted sum of exponentials."""
        i = tl.program_id(0)
        s, d = tl.arange(0, SPLITS_PAD), tl.arange(0, D)
        real = s < SPLITS
        m = tl.load(max_ptr + i * SPLITS + s, mask=real, other=float("-inf"))
        w = tl.exp(m - tl.max(m, 0))
        total = tl.sum(tl.load(sum_ptr + i * SPLITS + s, mask=real, other=0.0) * w, 0)
        part = tl.load(part_ptr + (i * SPLITS + s)[:, None] * D + d[None, :], mask=real[:, None], other=0.0)
        tl.store(dst_ptr + i * D + d, (tl.sum(part * w[:, None], 0) / total).to(dst_ptr.dtype.element_ty))


def supports(head_dim: int) -> bool:
    """Whether the kernel handles this head size (a power of two from 16 to 256)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


@torch.compiler.disable  # called as is from compiled layers: inductor would re-process the kernel per graph
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     kv_len: int, splits: int | None = None, block: int | None = None, warps: int = 4,
                     stages: int = 3) -> torch.Tensor:
    """softmax(q K^T / sqrt(d)) V for one query per row, over cache positions <= the row's position
    among the first `kv_len`. q (N, heads, d); caches (N, kv_heads, T, d), read in place (query head
    j uses KV head j // (heads / kv_heads), as transformers' repeat_kv); positions (N,).
    Returns (N, heads, d) in q's dtype.

    `splits` cuts each row's keys into slices read by programs of their own. By default a row is
    split only when there are fewer (row, KV head) programs than SMs, into slices of at least
    8 blocks: splitting 64 rows of 0.5B or 128 of 3B at 256-512 keys was slower than not
    (`bench/decode_attention.py`), the merge costing more than the parallelism gained. `block` keys
    per step (default 8192 / d up to 128, 16 KB of bf16 keys: the fastest measured at d = 64 and 128)."""
    N, heads, D = q.shape
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache, positions)):
        raise ValueError("decode_attention needs q, the caches and positions contiguous in their last dimension")
    block = block or min(128, 8192 // D)
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    if splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        splits = max(1, min(math.ceil(kv_len / (8 * block)), math.ceil(sms / (N * kv_heads))))
    chunk = math.ceil(math.ceil(kv_len / splits) / block) * block
    dst = torch.empty(N, heads, D, device=q.device, dtype=q.dtype)
    part = row_max = row_sum = dst  # one split writes dst alone; these are never touched
    if splits > 1:
        part = torch.empty(N, heads, splits, D, device=q.device, dtype=torch.float32)
        row_max, row_sum = (torch.empty(N, heads, splits, device=q.device, dtype=torch.float32) for _ in range(2))
    _split_kv_attention[(N, kv_heads, splits)](
        q, k_cache, v_cache, positions, dst, part, row_max, row_sum,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), kv_len, chunk,
        SPLITS=splits, SCALE=D ** -0.5, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=D,
        BLOCK=block, IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages)
    if splits > 1:
        _merge_splits[(N * heads,)](part, row_max, row_sum, dst, SPLITS=splits,
                                    SPLITS_PAD=triton.next_power_of_2(splits), D=D)
    return dst
