"""FastEngine: a compact rollout decoder for Qwen2/Llama-shaped causal LMs: fused weights, a static
KV cache read in place by grouped-query attention, decode bursts captured as one CUDA graph, stop
detection on the device, and finished episodes' slots refilled with new questions of the phase."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from agents import decode_attention
from agents.rollout import ForcedSchedule, RolloutStats, episode_seed
from envs.episode import CALLING, GENERATING, eos_token_ids, token_texts
from envs.tags import STOP_STRINGS
from envs.vector import MultiRouteVectorEnv

log = logging.getLogger("routerl")
_M32 = 0xFFFFFFFF
_NEVER = 1 << 40  # a token count no episode reaches


# ---------------------------------------------------------------- sampling

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32 in int64 without overflow (c split into 16-bit halves)."""
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply, the 'lowbias32' constants)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keyed_uniform(keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """U(0, 1) in float64 (53 random bits), a pure function of (episode key, token index): the
    sample of an episode's n-th token never depends on batch layout, slot or how far others ran."""
    lo, hi = keys & _M32, (keys >> 32) & _M32
    x = _mix32(lo ^ _mix32(hi ^ _mix32(counts & _M32)))
    y = _mix32(x ^ 0x9E3779B9)
    return (((x << 21) | (y >> 11)).double() + 0.5) / float(1 << 53)


def sample_scores(scores: torch.Tensor, u: torch.Tensor, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of scores (R, V), log-probabilities up to a constant (-inf: never chosen): the first
    index whose cumulative mass exceeds u * total, an exact sample of softmax(scores) for u ~ U(0, 1),
    and log Z = logsumexp(scores). One pass over the row gives each block of `block` entries its
    maximum and sum of exp(score - maximum), hence the blocks' masses (float64) and log Z; the
    sample is then the block whose running mass crosses the target, and the entry inside it whose
    running mass (scaled to that block's) crosses the remainder. No scan runs over the whole
    vocabulary (a 150k-long cumulative sum per row is the slowest kernel of a decode step)."""
    R, V = scores.shape
    K = -(-V // block)
    blocks = F.pad(scores, (0, K * block - V), value=float("-inf")).view(R, K, block)
    top = blocks.amax(-1).clamp(min=torch.finfo(scores.dtype).min)  # (R, K); an all -inf block adds nothing
    within = (blocks - top[..., None]).exp()
    row_max = top.amax(-1, keepdim=True)
    mass = within.sum(-1).double() * (top - row_max).double().exp()  # (R, K)
    cum = mass.cumsum(-1)
    total = cum[:, -1:]
    log_z = (row_max + total.log()).squeeze(-1).to(scores.dtype)
    k = torch.searchsorted(cum, u[:, None] * total, right=True).clamp(max=K - 1)  # (R, 1)
    share = (u[:, None] * total - (cum.gather(-1, k) - mass.gather(-1, k))) / mass.gather(-1, k)  # in [0, 1)
    inner = within.gather(1, k[:, :, None].expand(R, 1, block))[:, 0].cumsum(-1, dtype=torch.float64)
    j = torch.searchsorted(inner, share * inner[:, -1:], right=True).clamp(max=block - 1)
    return (k * block + j)[:, 0].clamp(max=V - 1), log_z


def choose_tokens(logits: torch.Tensor, temperature: float, top_p: float, keys: torch.Tensor,
                  counts: torch.Tensor, forced_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row (R, V) and its log-probability, as `sample_tokens` defines them.

    T = 0 is greedy. Otherwise an exact sample of softmax(logits / T) over the top-p nucleus (the
    same nucleus rule as `sample_tokens`) by inverting its CDF (`sample_scores`) at one keyed
    uniform per row; the log-prob is under that renormalised distribution. A row whose token
    index `count` has a forced id (`forced_ids[count] >= 0`; counts past the table's end have none)
    writes it instead, with log softmax(logits / T)[token] (T = 1 if greedy).
    """
    lf = logits.float()
    scaled = lf / temperature if temperature else lf  # the forced tokens' distribution is softmax(scaled)
    if temperature == 0:
        log_z = torch.logsumexp(scaled, -1)
        tokens = lf.argmax(-1)
        lp = scaled.gather(-1, tokens[:, None]).squeeze(-1) - log_z
    elif top_p < 1.0:
        log_z = torch.logsumexp(scaled, -1)
        sorted_lp, order = (scaled - log_z[:, None]).sort(-1, descending=True)
        sorted_p = sorted_lp.exp()
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # the token that crosses top_p is kept
        at, log_z_p = sample_scores(sorted_lp.masked_fill(~keep, float("-inf")), keyed_uniform(keys, counts))
        tokens = order.gather(-1, at[:, None]).squeeze(-1)
        lp = sorted_lp.gather(-1, at[:, None]).squeeze(-1) - log_z_p
    else:
        tokens, log_z = sample_scores(scaled, keyed_uniform(keys, counts))
        lp = scaled.gather(-1, tokens[:, None]).squeeze(-1) - log_z
    forced_tokens = torch.where(counts < forced_ids.shape[0], forced_ids[counts.clamp(max=forced_ids.shape[0] - 1)], -1)
    forced = forced_tokens >= 0
    forced_tokens = forced_tokens.clamp(min=0)
    forced_lp = scaled.gather(-1, forced_tokens[:, None]).squeeze(-1) - log_z
    return torch.where(forced, forced_tokens, tokens), torch.where(forced, forced_lp, lp)


# ---------------------------------------------------------------- the model

@dataclass
class LayerWeights:
    norm1: torch.Tensor
    qkv: torch.Tensor  # (q + 2 kv heads) * head_dim x hidden: q, k, v projections stacked
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    norm2: torch.Tensor
    gate_up: torch.Tensor  # 2 * intermediate x hidden: gate and up projections stacked
    down: torch.Tensor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' Qwen2/Llama compute it: normalise in float32, cast, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def decoder_layer(x, delta, norm1, qkv, qkv_bias, out, norm2, gate_up, down, kc, vc, rows, slots, positions, cos,
                  sin, mask, kv_len: int, heads: int, kv_heads: int, eps: float,
                  fused_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm decoder layer on the residual stream x + delta (N, Lq, hidden): fused QKV, RoPE,
    K/V written into the cache rows `rows` at `positions`, grouped-query attention over the first
    `kv_len` cache positions, output projection, fused gate-up SwiGLU MLP; residuals in x's dtype.
    Returns (the stream after attention, the MLP's output): the next layer adds them, in the same
    kernel as its first norm. `mask` (`FastModel.attention_mask`) says what each query sees; None: a
    prefill whose rows all start at position 0, causal attention over its own keys. `fused_attention`:
    a decode step (every cache row, in order) rotates, writes the cache and attends in the Triton
    split-KV kernel, over each row's filled length."""
    N, Lq, _ = x.shape
    d = cos.shape[-1]
    x = x + delta
    h = rms_norm(x, norm1, eps)
    q, k, v = F.linear(h, qkv, qkv_bias).split([heads * d, kv_heads * d, kv_heads * d], -1)
    if Lq == 1 and fused_attention:  # RoPE, the cache write and attention in one kernel
        attn = decode_attention.decode_attention(
            q.view(N, heads, d), kc, vc, positions[:, 0], kv_len, k_new=k.view(N, kv_heads, d),
            v_new=v.view(N, kv_heads, d), cos=cos.view(N, d), sin=sin.view(N, d)).view(N, 1, heads * d)
    else:
        q = q.view(N, Lq, heads, d)
        k = k.view(N, Lq, kv_heads, d)
        v = v.view(N, Lq, kv_heads, d)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        kc[rows[:, None], :, positions] = k  # advanced indices first: (N, Lq, kv_heads, d)
        vc[rows[:, None], :, positions] = v
        if mask is None:  # every row starts at 0: its keys are its own tokens (padding comes last)
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=True).transpose(1, 2)
        else:  # the mask's last dimension is kv_len (symbolic in a prefill: one graph for every cache length)
            keys, values = kc[:, :, :mask.shape[-1]], vc[:, :, :mask.shape[-1]]
            if slots is not None:
                keys, values = keys[slots], values[slots]
            if Lq == 1:
                attn = matmul_decode_attention(q, keys, values, mask)
            else:
                attn = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                                      enable_gqa=True).transpose(1, 2)
        attn = attn.reshape(N, Lq, heads * d)
    x = x + F.linear(attn, out)
    gate, up = F.linear(rms_norm(x, norm2, eps), gate_up).chunk(2, -1)
    return x, F.linear(F.silu(gate) * up, down)


def _rows_and_width_symbolic(*tensors: torch.Tensor) -> None:
    """Compile a prefill once for every row count and width: the first two dimensions of its inputs
    are symbolic from the first compile, not after a recompile (a size of 1 still gets its own graph)."""
    for t in tensors:
        for dim in range(min(t.dim(), 2)):
            torch._dynamo.maybe_mark_dynamic(t, dim)


def matmul_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            hidden_mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention of one query per row, q (N, 1, heads, d), over keys and values
    (N, kv_heads, kv_len, d) read in place: the query heads of a KV head share its rows in two
    batched matmuls. hidden_mask (N, 1, 1, 1, kv_len) hides positions. Returns (N, heads, d)."""
    N, _, heads, d = q.shape
    kv_heads, kv_len = keys.shape[1], keys.shape[2]
    g = heads // kv_heads
    scores = torch.matmul(q.view(N, kv_heads, g, d), keys.transpose(-1, -2)).view(N, kv_heads, g, 1, kv_len)
    scores = (scores.float() * d ** -0.5).masked_fill(hidden_mask, float("-inf"))
    probs = torch.softmax(scores, -1).to(q.dtype).view(N, kv_heads, g, kv_len)
    return torch.matmul(probs, values).view(N, heads, d)


def final_hidden(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The last layer's residual sum, through the final norm."""
    return rms_norm(x + delta, weight, eps)


def _layout(model, clone: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[LayerWeights]]:
    """(embedding, final norm, LM head, per-layer weights) of a transformers Qwen2/Llama model, with
    the QKV and gate-up projections concatenated. `clone` makes every tensor new storage (a tied LM
    head stays the embedding); otherwise the unfused tensors are the model's own."""
    own = (lambda t: t.detach().clone()) if clone else (lambda t: t.detach())
    trunk = model.get_decoder()
    embed = own(trunk.embed_tokens.weight)
    head = model.get_output_embeddings().weight
    lm_head = embed if head is trunk.embed_tokens.weight else own(head)
    layers = []
    for layer in trunk.layers:
        a, m = layer.self_attn, layer.mlp
        projections = (a.q_proj, a.k_proj, a.v_proj)
        qkv_bias = None
        if any(p.bias is not None for p in projections):
            qkv_bias = torch.cat([p.bias.detach() if p.bias is not None else torch.zeros_like(p.weight[:, 0])
                                  for p in projections])
        layers.append(LayerWeights(
            own(layer.input_layernorm.weight), torch.cat([p.weight.detach() for p in projections]), qkv_bias,
            own(a.o_proj.weight), own(layer.post_attention_layernorm.weight),
            torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(), own(m.down_proj.weight)))
    return embed, own(trunk.norm.weight), lm_head, layers


class FastModel:
    """The weights of a transformers Qwen2/Llama causal LM, re-laid out for decoding, and its
    forward pass over a static per-layer KV cache of shape (slots, kv_heads, max_len + 1, head_dim).
    The last cache position is scratch: padding writes land there and attention never reads it.

    The model owns copies of the weights (fused QKV and gate-up need new storage anyway, and CUDA
    graphs record addresses): `load_weights` refreshes them in place after each update, e.g. from
    parameters gathered under ZeRO-3.

    attention: how a decode step attends; "triton" the split-KV kernel of `decode_attention`, "matmul"
    two batched matmuls over the bucketed cache length, "auto" the kernel on a GPU with Triton."""

    def __init__(self, model, slots: int, max_len: int, attention: str = "auto"):
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        trunk = model.get_decoder()
        self.tied = model.get_output_embeddings().weight is trunk.embed_tokens.weight
        self.embed, self.final_norm, self.lm_head, self.layers = _layout(model, clone=True)
        self.slots, self.max_len, self.scratch = slots, max_len, max_len
        shape = (slots, self.kv_heads, max_len + 1, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        positions = torch.arange(max_len + 1, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = trunk.rotary_emb(probe, positions)  # the model's own RoPE table, in its dtype
        self.cos, self.sin = cos[0], sin[0]
        self.compiled_layer = self.compiled_prefill = self.compiled_final = None
        if attention not in ("auto", "triton", "matmul"):
            raise ValueError(f"attention must be auto, triton or matmul, got {attention!r}")
        runs = decode_attention.available(self.device) and decode_attention.supports(self.head_dim)
        if attention == "triton" and not runs:
            raise ValueError(f"attention='triton' needs Triton, a CUDA device (not {self.device}) and a power-of-two "
                             f"head size from 16 to 256 (not {self.head_dim})")
        self.fused_attention = attention == "triton" or (attention == "auto" and self.device.type == "cuda" and runs)

    @torch.no_grad()
    def load_weights(self, model) -> None:
        """Copy `model`'s current weights into this model's buffers (same shapes; addresses kept)."""
        embed, final_norm, lm_head, layers = _layout(model, clone=False)
        mine = [self.embed, self.final_norm] + ([] if self.tied else [self.lm_head])
        theirs = [embed, final_norm] + ([] if self.tied else [lm_head])
        for a, b in zip(self.layers, layers):
            mine += [t for t in vars(a).values() if t is not None]
            theirs += [t for t in vars(b).values() if t is not None]
        for dst, src in zip(mine, theirs):
            dst.copy_(src)

    def compile(self, autotune: bool = False, backend: str | Callable = "inductor") -> None:
        """Fuse each layer's small operations with torch.compile (GPU): decode once per cache length,
        shared by all layers; prefill once for all row counts, widths and cache lengths (`forward` marks
        them symbolic), the weights' sizes staying constants (with every size symbolic, the elementwise
        kernels computed their indices from runtime sizes, and a 0.5B phase's prefills took 124 ms of
        device time instead of 94).
        `autotune`: the decode layer's matmuls are chosen by timing Triton and cuBLAS kernels
        (inductor's max-autotune; slower to compile). `backend`: torch.compile's (tests count graphs)."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # shapes x buckets
        mode = "max-autotune-no-cudagraphs" if autotune and backend == "inductor" else None
        self.compiled_layer = torch.compile(decoder_layer, dynamic=False, mode=mode, backend=backend)
        self.compiled_prefill = torch.compile(decoder_layer, dynamic=None, backend=backend)
        self.compiled_final = torch.compile(final_hidden, dynamic=None, backend=backend)

    def attention_mask(self, positions: torch.Tensor, kv_len: int, from_start: bool) -> torch.Tensor | None:
        """What the queries at `positions` (N, Lq) see of the first `kv_len` cache positions: key s is
        visible to the query at position p iff s <= p. A decode step (Lq = 1) gets the hidden positions
        (N, 1, 1, 1, kv_len), a prefill the visible ones (N, 1, Lq, kv_len), or None if every row starts
        at position 0."""
        if from_start:
            return None
        hidden = torch.arange(kv_len, device=positions.device)[None, None, :] > positions[:, :, None]
        return hidden[:, None, None] if positions.shape[1] == 1 else ~hidden[:, None]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None,
                kv_len: int, from_start: bool = False) -> torch.Tensor:
        """Final hidden states (N, Lq, hidden) of tokens `ids` (N, Lq) at `positions` (N, Lq) of
        cache rows `slots` (N,) (None: all rows, in order). Each token's K/V is written into the cache
        at its position; it attends to cache positions <= its own, among the first `kv_len`.
        A position equal to `self.scratch` marks padding, which comes after a row's tokens.
        `from_start`: every row's tokens start at position 0 (prompts), so they attend to each other alone."""
        N = ids.shape[0]
        rows = torch.arange(N, device=ids.device) if slots is None else slots
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]
        mask = self.attention_mask(positions, kv_len, from_start)
        x = F.embedding(ids, self.embed)
        delta = torch.zeros_like(x)
        layer = (self.compiled_layer if slots is None else self.compiled_prefill) or decoder_layer
        if slots is not None:
            _rows_and_width_symbolic(x, delta, rows, slots, positions, cos, sin)
            if mask is not None:  # (rows, 1, width, kv_len)
                for dim in (0, 2, 3):
                    torch._dynamo.maybe_mark_dynamic(mask, dim)
        for w, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            x, delta = layer(x, delta, w.norm1, w.qkv, w.qkv_bias, w.out, w.norm2, w.gate_up, w.down, kc, vc, rows,
                             slots, positions, cos, sin, mask, kv_len, self.heads, self.kv_heads, self.eps,
                             self.fused_attention and slots is None)
        if slots is not None:
            _rows_and_width_symbolic(x, delta)
        return (self.compiled_final or final_hidden)(x, delta, self.final_norm, self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head)


# ---------------------------------------------------------------- the engine

def supports(model) -> bool:
    """Whether FastModel can decode `model`: a Qwen2 or Llama decoder without sliding-window
    attention (other architectures use the simple path)."""
    cfg = model.config
    return cfg.model_type in ("qwen2", "llama") and not getattr(cfg, "use_sliding_window", False)


def token_tails(tokenizer, vocab_size: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `width` characters of every token's text as codes, right-aligned ((V, width) int32,
    0 = no character), and how many there are ((V,) long)."""
    texts = token_texts(tokenizer)[:vocab_size]
    codes = torch.zeros(vocab_size, width, dtype=torch.int32)
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    for i, text in enumerate(texts):
        tail = text[-width:]
        if tail:
            codes[i, width - len(tail):] = torch.tensor([ord(c) for c in tail], dtype=torch.int32)
            lengths[i] = len(tail)
    return codes, lengths


def extend_tails(tails: torch.Tensor, token_codes: torch.Tensor, token_lengths: torch.Tensor,
                 stops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Append each row's new token text (its right-aligned codes and length) to the row's last
    characters `tails` (B, W). Returns the new tails and whether a stop string (codes) ends inside
    the new token's characters: the device's test for `</search>` or `</answer>` however BPE split it."""
    B, W = tails.shape
    j = torch.arange(W, device=tails.device)[None]
    fresh = j >= (W - token_lengths)[:, None]  # positions now holding the new token's characters
    shifted = tails.gather(1, (token_lengths[:, None] + j).clamp(max=W - 1))
    new = torch.where(fresh, token_codes, shifted)
    hit = torch.zeros(B, dtype=torch.bool, device=tails.device)
    for stop in stops:
        L = stop.shape[0]
        match = (new.unfold(1, L, 1) == stop).all(-1)  # (B, W - L + 1): a window spells the stop string
        ends = torch.arange(L - 1, W, device=tails.device)[None]
        hit |= (match & (ends >= (W - token_lengths)[:, None])).any(-1)
    return new, hit


def forced_plan(forced: ForcedSchedule | None, tokenizer) -> tuple[dict[int, int], list[int]]:
    """The forced schedule as `run_rollouts` writes it: the id forced at each policy-token count (a
    chunk starting inside an earlier chunk's tokens is never used), and the counts at which a chunk
    whose text holds a stop string ends (the device freezes the row there at the latest, so the host
    knows in advance)."""
    ids, closing, end = {}, [], 0
    for start in sorted(forced.chunks if forced else {}):
        chunk = list(forced.chunks[start])
        if start >= end and chunk:
            ids.update(zip(range(start, start + len(chunk)), chunk))
            end = start + len(chunk)
            if any(stop in tokenizer.decode(chunk, skip_special_tokens=False) for stop in STOP_STRINGS):
                closing.append(end)
    return ids, closing


def advance_rows(nxt: torch.Tensor, active: torch.Tensor, tails: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor,
                 count: torch.Tensor, stop_at: torch.Tensor, eos: torch.Tensor, token_codes: torch.Tensor,
                 token_lengths: torch.Tensor, stops: list[torch.Tensor]) -> None:
    """Advance the active rows by their chosen tokens `nxt`, in place: their text tails, last token,
    position and count; then freeze the rows whose text ended a stop string, that chose an EOS id or
    that reached their stop count."""
    new_tails, stopped = extend_tails(tails, token_codes[nxt], token_lengths[nxt], stops)
    tails.copy_(torch.where(active[:, None], new_tails, tails))
    tok.copy_(torch.where(active, nxt, tok))
    pos.add_(active.long())
    count.add_(active.long())
    active.copy_(active & ~stopped & ~eos[nxt] & (count < stop_at))


@dataclass
class Slot:
    """Host view of one cache row: its episode, its last token (not yet in the cache) and that
    token's position, and whether its text starts anew (a prompt, or a reply just inserted) at the
    next upload."""

    episode: int | None = None
    token: int = 0
    pos: int = 0
    restart: bool = False


class FastEngine:
    """Runs rollout phases with `FastModel`: `slots` episodes decode together; a slot whose episode
    ends takes the next waiting one. The device decodes `burst` tokens per call (one CUDA graph
    replay on GPU, eager on CPU) and freezes a row as soon as its text ends a stop string
    (`</search>`, `</answer>`: `extend_tails` on the device), it samples an EOS id or it reaches
    its stop count, so Python sees every token once, in batches, and acts only at stops. The next
    burst starts before Python reads the last one's tokens, so the env's work overlaps decoding.

    Use `run(...)` directly or `run_rollouts(..., engine=engine)`: same arguments, same results
    as the simple path (token for token with greedy decoding)."""

    def __init__(self, model, tokenizer, slots: int, max_len: int, burst: int = 8, bucket: int = 256,
                 prefill_tokens: int = 16384, use_graphs: bool | None = None, compile: bool = True,
                 extra_eos_ids=(), attention: str = "auto", autotune: bool = False, call_window_s: float = 0.05):
        # cache positions rounded up to the bucket: every attention length read is a multiple of it
        # (an unaligned length such as 785 makes the attention matmuls twice as slow); a row may run
        # two bursts past the host's last look at it
        self.net = FastModel(model, slots, _round_up(max_len + 2 * burst + 1, bucket), attention)
        self.max_len, self.burst, self.bucket, self.prefill_tokens = max_len, burst, bucket, prefill_tokens
        self.call_window_s = call_window_s
        self.tokenizer = tokenizer
        dev = self.net.device
        self.use_graphs = (dev.type == "cuda") if use_graphs is None else use_graphs
        self.choose, self.advance = choose_tokens, advance_rows
        if self.use_graphs and compile:
            self.net.compile(autotune)
            self.choose = torch.compile(choose_tokens, dynamic=False)  # the vocabulary-wide work, fused
            self.advance = torch.compile(advance_rows, dynamic=False)  # a few dozen small kernels, fused
        vocab = self.net.lm_head.shape[0]
        self.eos = torch.zeros(vocab, dtype=torch.bool)
        self.eos[list(eos_token_ids(tokenizer, extra_eos_ids))] = True
        self.eos = self.eos.to(dev)
        # the device's view of each row's text: its last characters, for stop strings split over tokens
        width = 2 * max(len(t) for t in STOP_STRINGS)
        self.token_codes, self.token_lengths = (t.to(dev) for t in token_tails(tokenizer, vocab, width))
        self.stops = [torch.tensor([ord(c) for c in t], dtype=torch.int32, device=dev) for t in STOP_STRINGS]
        B = slots
        z = lambda dtype=torch.long: torch.zeros(B, dtype=dtype, device=dev)
        self.tok, self.pos, self.count, self.stop_at, self.key = z(), z(), z(), z(), z()
        self.active = z(torch.bool)
        self.tails = torch.zeros(B, width, dtype=torch.int32, device=dev)
        # the phase's forced id at each policy-token count (-1: sampled), for every row; a count never
        # exceeds a position, so the table covers every count a row can reach
        self.forced_ids = torch.full((self.net.scratch + 1,), -1, dtype=torch.long, device=dev)
        self.closing: list[int] = []  # counts at which a forced chunk freezes its row (`forced_plan`)
        self.row_stops = [0] * B  # each row's stop count, as last uploaded
        self.epoch = [0] * B  # uploads per row: a burst's tokens count only for the upload they ran under
        self.out_tok = torch.zeros(B, burst, dtype=torch.long, device=dev)
        self.out_lp = torch.zeros(B, burst, dtype=torch.float, device=dev)
        self.out_valid = torch.zeros(B, burst, dtype=torch.bool, device=dev)
        # two pinned host copies of a burst's outputs: one in flight while the host reads the other
        outputs = (self.out_tok, self.out_lp, self.out_valid, self.active)
        self.host_out = [[torch.empty(t.shape, dtype=t.dtype, pin_memory=self.use_graphs) for t in outputs]
                         for _ in range(2)]
        self.launches = 0
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.prefill_graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]] = {}
        self.pool = None
        # wall time of each part of `run` (prefill: settling slots, calls and prefill included; calls:
        # making the calls and inserting the replies, within prefill; upload: host state to the device
        # and launching a burst; decode: waiting for a burst's tokens; env: pushing them; capture:
        # graphs of new shapes, inside prefill or upload), the decode steps run, plain and times their
        # cache length, the decode steps run while calls were out, the bursts in which no row decoded, the
        # graphs captured, and the episodes ended for lack of cache room (`_out_of_room`)
        self.timings = dict.fromkeys(("prefill_s", "calls_s", "upload_s", "decode_s", "env_s", "capture_s",
                                      "decode_steps", "decode_kv_steps", "steps_during_calls", "idle_bursts",
                                      "captures", "out_of_room"), 0.0)

    def load_weights(self, model) -> None:
        """Refresh the engine's weights from `model` (the same architecture), e.g. after an update."""
        self.net.load_weights(model)

    # -- device side

    def _step(self, j: int, kv_len: int, temperature: float, top_p: float) -> None:
        """One decode step for every row: write `tok` at `pos`, choose the next token, advance the
        active rows, and freeze rows whose text ended a stop string, that chose an EOS id or that
        reached their stop count."""
        hidden = self.net.forward(self.tok[:, None], self.pos[:, None], None, kv_len)
        logits = self.net.logits(hidden[:, 0])
        nxt, lp = self.choose(logits, temperature, top_p, self.key, self.count, self.forced_ids)
        self.out_tok[:, j] = nxt
        self.out_lp[:, j] = lp
        self.out_valid[:, j] = self.active
        self.advance(nxt, self.active, self.tails, self.tok, self.pos, self.count, self.stop_at, self.eos,
                     self.token_codes, self.token_lengths, self.stops)

    def _burst(self, kv_len: int, temperature: float, top_p: float) -> None:
        for j in range(self.burst):
            self._step(j, kv_len, temperature, top_p)

    def _decode(self, kv_len: int, temperature: float, top_p: float) -> None:
        """Decode `burst` tokens for every active row: one graph replay on GPU."""
        if not self.use_graphs:
            return self._burst(kv_len, temperature, top_p)
        key = (kv_len, temperature, top_p)
        if key not in self.graphs:
            state = (self.tok, self.pos, self.count, self.active, self.tails)  # what a burst advances
            saved = [t.clone() for t in state]

            def restore() -> None:
                for t, s in zip(state, saved):
                    t.copy_(s)

            def drop_compiled() -> bool:
                if self.net.compiled_layer is None and self.choose is choose_tokens and not self.net.fused_attention:
                    return False
                self.net.compiled_layer, self.net.compiled_final = None, None
                self.net.fused_attention = False
                self.choose, self.advance = choose_tokens, advance_rows
                restore()
                return True
            self.graphs[key] = self._capture(lambda: self._burst(kv_len, temperature, top_p),
                                             drop_compiled, "decode step")
            restore()  # the warm-up advanced the rows; the replay below does it for real
        self.graphs[key].replay()

    def _capture(self, work, drop_compiled, what: str) -> torch.cuda.CUDAGraph:
        """`work` captured as a CUDA graph in the engine's shared memory pool, after one warm-up run
        (which compiles) on a side stream. If compiling fails (inductor, or the Triton attention kernel),
        `drop_compiled` falls back to eager PyTorch (True if it had compiled code to drop) and the
        warm-up runs again: a compiler failure costs speed, never the run. Counted in `timings` (a shape
        seen for the first time)."""
        t0 = time.perf_counter()
        with torch.no_grad():  # compiled for inference whoever calls first (compiled code guards on grad mode)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                try:
                    work()
                except Exception as e:
                    if not drop_compiled():
                        raise
                    log.warning("compiling the %s failed (%s); running it in eager PyTorch in CUDA graphs", what,
                                str(e).splitlines()[0] if str(e) else type(e).__name__)
                    work()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                work()
        self.pool = graph.pool()
        self.timings["captures"] += 1
        self.timings["capture_s"] += time.perf_counter() - t0
        return graph

    def cache_len(self, top: int) -> int:
        """The attention length for positions below `top`: rounded up to the bucket (one graph per
        bucket; the cache itself is a whole number of buckets)."""
        return min(self.net.scratch, _round_up(top, self.bucket))

    # -- host side

    def _upload(self, rows: list[int], slots: list[Slot], env: MultiRouteVectorEnv, keys: list[int]) -> None:
        """Write the host's view of the given rows into the device buffers, in stream order (no wait
        for a burst in flight). The other rows keep the state their bursts advanced; a row whose
        text starts anew gets empty tails (the env's tag scanner starts anew there too)."""
        limit = env.cfg.max_response_tokens
        values = []
        restart = [r for r in rows if slots[r].restart]
        for r in rows:
            s = slots[r]
            s.restart = False
            ep = env.episodes[s.episode] if s.episode is not None else None
            running = ep is not None and ep.state == GENERATING
            count = ep.policy_tokens if ep is not None else 0
            self.row_stops[r] = min(limit, _next_closing(self.closing, count))
            values.append([s.token, s.pos if ep is not None else self.net.scratch - self.burst, count, running,
                           self.row_stops[r], keys[s.episode] if ep is not None else 0])
            self.epoch[r] += 1
        idx = _to_device(torch.tensor(rows), self.net.device)
        columns = _to_device(torch.tensor(values, dtype=torch.long), self.net.device)
        for k, name in enumerate(("tok", "pos", "count", "active", "stop_at", "key")):
            buf = getattr(self, name)
            buf[idx] = columns[:, k].to(buf.dtype)
        if restart:
            self.tails[_to_device(torch.tensor(restart), self.net.device)] = 0

    def _out_of_room(self, episode, needed: int) -> None:
        """End an episode whose reply or decoding needs more cache positions than the engine has
        (reason "context"): a too-small `max_len` costs that episode, never the run."""
        if not self.timings["out_of_room"]:
            log.warning("an episode needs %d cache positions, past the engine's max_len=%d: ended there (raise "
                        "rollout.engine_max_len)", needed, self.max_len)
        self.timings["out_of_room"] += 1
        episode.truncate("context")

    def _launch(self, kv_len: int, temperature: float, top_p: float) -> Burst:
        """Start a burst of `burst` steps for every row and the copy of its tokens to the host; returns
        without waiting for either."""
        self._decode(kv_len, temperature, top_p)
        self.timings["decode_steps"] += self.burst
        self.timings["decode_kv_steps"] += self.burst * kv_len
        out = (self.out_tok, self.out_lp, self.out_valid, self.active)
        if not self.use_graphs:
            return Burst([t.clone() for t in out], None, list(self.epoch))
        self.launches += 1
        host = self.host_out[self.launches % 2]  # the burst read last used the other set
        for h, t in zip(host, out):
            h.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Burst(host, done, list(self.epoch))

    def _append(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, kv_len: int,
                from_start: bool) -> None:
        """Write the K/V of ids (n, w) at positions into cache rows `rows` (`from_start`: every row
        starts at position 0). On GPU one CUDA graph per (n, w, kv_len, from_start) bucket: an eager
        prefill spends most of its time launching kernels when it appends a few dozen reply tokens."""
        if not self.use_graphs:
            self.net.forward(ids, positions, rows, kv_len, from_start)
            return
        key = (*ids.shape, kv_len, from_start)
        if key not in self.prefill_graphs:
            inputs = [t.clone() for t in (ids, positions, rows)]

            def drop_compiled() -> bool:
                had = self.net.compiled_prefill is not None
                self.net.compiled_prefill = self.net.compiled_final = None
                return had
            # the warm-up writes the same K/V the replay writes
            work = lambda: self.net.forward(inputs[0], inputs[1], inputs[2], kv_len, from_start)
            self.prefill_graphs[key] = (self._capture(work, drop_compiled, "prefill"), inputs)
        graph, inputs = self.prefill_graphs[key]
        for dst, src in zip(inputs, (ids, positions, rows)):
            dst.copy_(src)
        graph.replay()

    def _prefill(self, jobs: list[tuple[int, Slot, list[int], int]]) -> None:
        """Append ids into the cache rows of the given slots (prompts, or a last token plus the env's
        `<info>` ids) but the last, which becomes the slot's token: the next burst decodes it and
        chooses what follows, so the host waits for nothing here. jobs: (row, slot, ids, start
        position). Groups are padded to a power-of-two row count and a width of `_bucket_width` and
        their cache length rounded up to `bucket`, so few shapes recur (each is one CUDA graph):
        padding rows repeat the group's first row, and every padding token sits at the scratch
        position."""
        for row, s, seq, start in jobs:
            s.token, s.pos, s.restart = seq[-1], start + len(seq) - 1, True
        jobs = [(row, seq[:-1], start) for row, _, seq, start in jobs if len(seq) > 1]
        dev = self.net.device
        rows_for = lambda n: min(max(_pow2_at_least(n), 2), self.net.slots)  # one row would get a graph of its own
        i = 0
        while i < len(jobs):  # groups of at most `prefill_tokens` padded tokens
            group, longest = [jobs[i]], len(jobs[i][1])
            i += 1
            while i < len(jobs) and (rows_for(len(group) + 1) * _bucket_width(max(longest, len(jobs[i][1])))
                                     <= self.prefill_tokens):
                longest = max(longest, len(jobs[i][1]))
                group.append(jobs[i])
                i += 1
            n, width = rows_for(len(group)), _bucket_width(longest)
            lengths = np.zeros(n, dtype=np.int64)
            lengths[:len(group)] = [len(seq) for _, seq, _ in group]
            starts = np.zeros(n, dtype=np.int64)
            starts[:len(group)] = [start for _, _, start in group]
            filled = np.arange(width)[None] < lengths[:, None]  # (n, width), row-major like the ids below
            ids = np.zeros((n, width), dtype=np.int64)
            ids[filled] = np.fromiter(itertools.chain.from_iterable(seq for _, seq, _ in group), np.int64)
            positions = np.where(filled, starts[:, None] + np.arange(width)[None], self.net.scratch)
            rows = np.array([j[0] for j in group] + [group[0][0]] * (n - len(group)), dtype=np.int64)
            kv_len = self.cache_len(int((starts + lengths).max()))
            self._append(*(_to_device(torch.from_numpy(a), dev) for a in (ids, positions, rows)), kv_len,
                         from_start=not starts.any())

    @torch.no_grad()
    def run(self, env: MultiRouteVectorEnv, examples: list, temperature: float, top_p: float, seed: int,
            step: int, pad_id: int, index_offset: int = 0,
            forced: ForcedSchedule | None = None) -> tuple[list[list[float]], RolloutStats]:
        """Play one rollout phase (see `run_rollouts`); returns the sampler's log-prob of every policy
        token, per episode. `pad_id` is unused: the cache is never padded."""
        env.reset(examples)
        self.eos[sorted(env.eos_ids)] = True  # the env's own end-of-sequence ids stop a burst too
        self.timings = dict.fromkeys(self.timings, 0.0)
        n = len(examples)
        keys = [episode_seed(seed, step, index_offset + i) for i in range(n)]
        ids, self.closing = forced_plan(forced, self.tokenizer)
        table = torch.full(self.forced_ids.shape, -1, dtype=torch.long)
        at = [c for c in ids if c < len(table)]
        table[at] = torch.tensor([ids[c] for c in at], dtype=torch.long)
        self.forced_ids.copy_(table)  # in place: captured graphs read it at this address
        logps: list[list[float]] = [[] for _ in range(n)]
        stats = RolloutStats()
        waiting = deque(range(n))
        slots = [Slot() for _ in range(self.net.slots)]

        def accept(s: Slot, tokens: list[int], lps: list[float]) -> int:
            """Push chosen tokens of slot s's episode up to the env's stop; returns how many it took."""
            n = env.push_many(s.episode, tokens)
            logps[s.episode].extend(lps[:n])
            stats.generated_tokens += n
            return n

        # A pipeline of one burst: the next burst starts before the host reads the last one's tokens, so
        # the env's work overlaps the device's. A row the device froze (a stop string, EOS, its stop
        # count) sits out the burst in flight; the host then settles it and uploads it alone.
        inflight: Burst | None = None
        wake = set(range(len(slots)))  # rows to upload even if unchanged: all at first (state left by others)
        while True:
            t0 = time.perf_counter()
            rows = self._settle(slots, env, waiting, stats) | wake
            wake = set()
            t1 = time.perf_counter()
            if rows:
                self._upload(sorted(rows), slots, env, keys)
            running = [r for r, s in enumerate(slots)
                       if s.episode is not None and env.episodes[s.episode].state == GENERATING]
            launched = None
            if running and (inflight is None or self._may_decode(running, rows, slots, env)):
                # a row may be one unread burst ahead of the host's view: room for two
                launched = self._launch(self.cache_len(max(slots[r].pos for r in running) + 2 * self.burst + 1),
                                        temperature, top_p)
                self.timings["steps_during_calls"] += self.burst if env.calls_out else 0
            t2 = time.perf_counter()
            self.timings["prefill_s"] += t1 - t0
            self.timings["upload_s"] += t2 - t1
            if inflight is not None:
                wake = self._read(inflight, slots, env, accept)
            if launched is None and inflight is None:
                break
            inflight = launched
        return logps, stats

    def _may_decode(self, running: list[int], uploaded: set[int], slots: list[Slot], env) -> bool:
        """Whether a burst launched now, behind the one in flight, can decode a token: some running
        row stays below its stop count after the burst in flight (a row uploaded just now starts from
        the host's count; another may run that burst whole). A burst in which every row is frozen
        (e.g. all at a call) would only delay the host's next look."""
        lag = lambda r: 0 if r in uploaded else self.burst
        return any(env.episodes[slots[r].episode].policy_tokens + lag(r) < self.row_stops[r] for r in running)

    def _settle(self, slots: list[Slot], env, waiting: deque, stats: RolloutStats) -> set[int]:
        """Until every slot generates, waits for a reply or is empty: refill the slots whose episode
        ended, start the calls of the calling episodes (concurrently, in the background), take the
        replies that have arrived, and prefill prompts or replies. The other rows decode while calls
        are out; only when no row can, it waits: up to `call_window_s` for every reply (so calls made
        together come back together), then for the first. Returns the rows whose device state the host
        changed."""
        changed = set()
        while True:
            jobs = []
            for row, s in enumerate(slots):
                ep = env.episodes[s.episode] if s.episode is not None else None
                if ep is None or ep.done:
                    if s.episode is not None:
                        changed.add(row)
                    s.episode = waiting.popleft() if waiting else None
                    if s.episode is not None:
                        jobs.append((row, s, list(env.episodes[s.episode].prompt_ids), 0))
            calling = [row for row, s in enumerate(slots)
                       if s.episode is not None and env.episodes[s.episode].state == CALLING]
            if calling:
                t0 = time.perf_counter()
                env.submit()
                idle = not jobs and not any(s.episode is not None and env.episodes[s.episode].state == GENERATING
                                            for s in slots)
                inserted = env.collect(self.call_window_s if idle else 0.0, block=idle)
                self.timings["calls_s"] += time.perf_counter() - t0
                for row in calling:
                    s = slots[row]
                    if s.episode in inserted:
                        jobs.append((row, s, [s.token] + inserted[s.episode], s.pos))
            if not jobs:
                return changed
            for job in [j for j in jobs if j[3] + len(j[2]) > self.max_len]:  # the slot is refilled next round
                if job[3] == 0:  # a prompt: nothing to train on, a setting to fix
                    raise ValueError(f"a prompt of {len(job[2])} tokens does not fit the engine's max_len="
                                     f"{self.max_len} (raise rollout.engine_max_len)")
                self._out_of_room(env.episodes[job[1].episode], job[3] + len(job[2]))
                jobs.remove(job)
                changed.add(job[0])
            if not jobs:
                continue
            stats.segments += 1
            self._prefill(jobs)
            changed.update(j[0] for j in jobs)

    def _read(self, burst: Burst, slots: list[Slot], env, accept) -> set[int]:
        """Push a finished burst's tokens into the env, row by row, up to the device's or the env's
        stop; tokens of a row uploaded since the burst started are stale. Returns the rows the
        device froze while their episode still generates (e.g. at a forced window)."""
        t0 = time.perf_counter()
        if burst.done is not None:
            burst.done.synchronize()
        tok, lp, valid, active = (t.tolist() for t in burst.host)
        t1 = time.perf_counter()
        self.timings["idle_bursts"] += not any(map(any, valid))
        wake = set()
        for row, s in enumerate(slots):
            if s.episode is None or self.epoch[row] != burst.epoch[row]:
                continue
            ep = env.episodes[s.episode]
            decoded = valid[row].index(False) if False in valid[row] else self.burst  # the row froze there
            if decoded and ep.state == GENERATING:
                # a row the env stops first decodes on until its upload, into cache it overwrites
                n = accept(s, tok[row][:decoded], lp[row][:decoded])
                s.token, s.pos = tok[row][n - 1], s.pos + n
            if ep.state == GENERATING and s.pos >= self.max_len:
                self._out_of_room(ep, s.pos + 1)
            if ep.state == GENERATING and not active[row]:
                wake.add(row)
        self.timings["decode_s"] += t1 - t0
        self.timings["env_s"] += time.perf_counter() - t1
        return wake


@dataclass
class Burst:
    """A burst in flight: host copies of its tokens, log-probs, valid flags and the rows still active
    after it (pinned, filled when `done` fires), and each row's upload count when it started."""

    host: list[torch.Tensor]
    done: torch.cuda.Event | None
    epoch: list[int]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the work queued there (pinned, then an
    asynchronous copy in stream order)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bucket_width(n: int) -> int:
    """n rounded up to a multiple of 1/16 of its power of two (at least 16): at most 6.25% padding
    above 256 tokens, sixteen shapes per octave (a prefill graph is cheap to capture)."""
    return _round_up(n, max(16, _pow2_at_least(n) // 16))


def _next_closing(closing: list[int], count: int) -> int:
    """The first count after `count` at which a forced chunk freezes the row (`_NEVER` if none)."""
    return next((end for end in closing if end > count), _NEVER)
