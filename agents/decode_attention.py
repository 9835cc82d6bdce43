"""Grouped-query attention for one decode step as a Triton kernel (split-KV, "flash-decoding"):
each program reads one KV head's keys and values of one row once, over a slice of that row's
filled length only, for all the query heads that share them; a second kernel merges the slices.

The matmul path it replaces (`decoder_layer`'s Lq == 1 branch) reads the whole bucketed cache
length twice (scores, then values) and writes the scores out between. On CPU, or without Triton,
that path runs instead. Given the step's unrotated key and value and RoPE rows, the kernel also
rotates the query and key and writes the key and value into the cache."""

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
    def _rope(at, d, mask, cos, sin, D: tl.constexpr):
        """x * cos + rotate_half(x) * sin in float32, x loaded at `at` + d: rotate_half(x)[i] is
        -x[i + D/2] for i < D/2, else x[i - D/2], the element at (i + D/2) % D with a sign."""
        x = tl.load(at + d, mask=mask, other=0.0).to(tl.float32)
        partner = tl.load(at + (d + D // 2) % D, mask=mask, other=0.0).to(tl.float32)
        return x * cos + tl.where(d < D // 2, -partner, partner) * sin

    @triton.jit
    def _split_kv_attention(q_ptr, k_ptr, v_ptr, pos_ptr, dst_ptr, part_ptr, max_ptr, sum_ptr,
                            knew_ptr, vnew_ptr, cos_ptr, sin_ptr,
                            stride_qn, stride_qh, stride_kn, stride_kh, stride_kt, stride_vn, stride_vh, stride_vt,
                            stride_kxn, stride_kxh, stride_vxn, stride_vxh, stride_cos, stride_sin,
                            kv_len, chunk, SPLITS: tl.constexpr, SCALE: tl.constexpr, GROUP: tl.constexpr,
                            GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
                            ROPE: tl.constexpr):
        """Program (row n, KV head h, split s): softmax attention of the GROUP query heads of h over
        keys [s * chunk, min((s + 1) * chunk, length)), length = min(pos[n] + 1, kv_len), online
        (running max and sum of exponentials, float32). One split writes the output; several write
        their unnormalised outputs, maxima and sums for `_merge_splits`.

        ROPE: q and the new key are rotated here (float32, then rounded to q's and the cache's
        dtype), and split 0 writes the new key and value at pos[n] in every row, whatever kv_len.
        The cache is then read over [0, min(pos[n], kv_len)) only, and the new key and value join,
        from registers, the one split whose range holds pos[n] (none when pos[n] >= kv_len): a
        store is not ordered before other threads' or programs' loads."""
        n, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        pos = tl.load(pos_ptr + n)
        start = s * chunk
        g, d, t = tl.arange(0, GROUP_PAD), tl.arange(0, D), tl.arange(0, BLOCK)
        heads = h * GROUP + g
        keep = g < GROUP
        q_at = q_ptr + n * stride_qn + heads[:, None] * stride_qh
        k_row, v_row = k_ptr + n * stride_kn + h * stride_kh, v_ptr + n * stride_vn + h * stride_vh
        if ROPE:
            end = tl.minimum(start + chunk, tl.minimum(pos, kv_len))
            cos = tl.load(cos_ptr + n * stride_cos + d).to(tl.float32)
            sin = tl.load(sin_ptr + n * stride_sin + d).to(tl.float32)
            q = _rope(q_at, d[None, :], keep[:, None], cos[None, :], sin[None, :], D)
            q = q.to(q_ptr.dtype.element_ty)
            k_new = _rope(knew_ptr + n * stride_kxn + h * stride_kxh, d, d < D, cos, sin, D)
            k_new = k_new.to(k_ptr.dtype.element_ty)
            v_new = tl.load(vnew_ptr + n * stride_vxn + h * stride_vxh + d).to(v_ptr.dtype.element_ty)
            if s == 0:  # once per (n, h), also where pos[n] is in no split's range
                tl.store(k_row + pos * stride_kt + d, k_new)
                tl.store(v_row + pos * stride_vt + d, v_new)
        else:
            end = tl.minimum(start + chunk, tl.minimum(pos + 1, kv_len))
            q = tl.load(q_at + d[None, :], mask=keep[:, None], other=0.0)
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
        if ROPE:  # noqa: SIM102  (a constexpr test around a runtime one)
            if (pos < kv_len) & (pos // chunk == s):  # the same step for the one new key, p rounded as above
                score = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * SCALE
                m_new = tl.maximum(m_i, score)
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(score - m_new)
                l_i = l_i * alpha + p
                pv = p.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
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
                     stages: int = 3, *, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                     cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q K^T / sqrt(d)) V for one query per row, over cache positions <= the row's position
    among the first `kv_len`. q (N, heads, d); caches (N, kv_heads, T, d), read in place (query head
    j uses KV head j // (heads / kv_heads), as transformers' repeat_kv); positions (N,).
    Returns (N, heads, d) in q's dtype.

    With `k_new`, `v_new` (N, kv_heads, d) and `cos`, `sin` (N, d) (all four or none), the kernel
    also does the step's RoPE and cache write: q and k_new are the unrotated query and new key,
    rotated as x * cos + rotate_half(x) * sin in float32 (q then rounded to its dtype, the key to
    the cache's); the key and v_new are written into the caches at [n, :, positions[n]] for every
    row, also where positions[n] >= kv_len (a padding row's scratch slot), and attended only where
    positions[n] < kv_len, as if written first. q, k_new and v_new may be strided views (slices of
    a fused QKV output): only their last dimension must be contiguous.

    `splits` cuts each row's keys into slices read by programs of their own. By default a row is
    split only when there are fewer (row, KV head) programs than SMs, into slices of at least
    8 blocks: splitting 64 rows of 0.5B or 128 of 3B at 256-512 keys was slower than not
    (`bench/decode_attention.py`), the merge costing more than the parallelism gained. `block` keys
    per step (default 8192 / d up to 128, 16 KB of bf16 keys: the fastest measured at d = 64 and 128)."""
    N, heads, D = q.shape
    kv_heads = k_cache.shape[1]
    new = (k_new, v_new, cos, sin)
    rope = k_new is not None
    if len({t is None for t in new}) > 1:
        raise ValueError("decode_attention takes k_new, v_new, cos and sin all or none")
    if rope and [tuple(t.shape) for t in new] != [(N, kv_heads, D)] * 2 + [(N, D)] * 2:
        raise ValueError("decode_attention needs k_new, v_new (N, kv_heads, d) and cos, sin (N, d)")
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache, positions, *(new if rope else ()))):
        raise ValueError("decode_attention needs q, the caches, positions, k_new, v_new, cos and sin "
                         "contiguous in their last dimension")
    k_new, v_new, cos, sin = new if rope else (q,) * 4  # without ROPE, stand-ins never read
    block = block or min(128, 8192 // D)
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
        q, k_cache, v_cache, positions, dst, part, row_max, row_sum, k_new, v_new, cos, sin,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), cos.stride(0), sin.stride(0),
        kv_len, chunk,
        SPLITS=splits, SCALE=D ** -0.5, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=D,
        BLOCK=block, IEEE=q.dtype == torch.float32, ROPE=rope, num_warps=warps, num_stages=stages)
    if splits > 1:
        _merge_splits[(N * heads,)](part, row_max, row_sum, dst, SPLITS=splits,
                                    SPLITS_PAD=triton.next_power_of_2(splits), D=D)
    return dst
