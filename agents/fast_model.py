"""FastModel: the weights of a Qwen2/Llama causal LM re-laid out for decoding (fused QKV and gate-up
projections in buffers of its own) and its forward pass over a static per-layer KV cache, with
grouped-query attention read in place: the model that `agents.fast_decode.FastEngine` drives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from agents import decode_attention


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
        kernels computed their indices from runtime sizes, and prefills took longer: bench/README.md,
        "Rollout runs").
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


def supports(model) -> bool:
    """Whether FastModel can decode `model`: a Qwen2 or Llama decoder without sliding-window
    attention (other architectures use the simple path)."""
    cfg = model.config
    return cfg.model_type in ("qwen2", "llama") and not getattr(cfg, "use_sliding_window", False)
