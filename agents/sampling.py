"""Exact sampling of the next token from softmax(logits / T) restricted to the top-p nucleus, two ways
with the same rule: `sample_tokens` (the simple path: Gumbel-max with each episode's own generator)
and `choose_tokens` (the fast engine: the CDF inverted at one keyed uniform per row, on the device,
with forced ids written over sampled ones). T = 0 is greedy in both."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF


def in_nucleus(sorted_p: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of the probabilities sorted in descending order (..., V) form the top-p nucleus: those
    whose preceding mass is below top_p, so the token that crosses top_p is kept."""
    return (sorted_p.cumsum(-1) - sorted_p) < top_p


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from softmax(logits / T) restricted to the top-p nucleus; T = 0 is
    greedy. Exact: the Gumbel-max trick over the (renormalised) nucleus, with each row's noise drawn
    from that row's own generator. Returns tokens (R,) and their log-probabilities (R,) under the
    distribution actually sampled from."""
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_lp, order = logp.sort(-1, descending=True)
        sorted_p = sorted_lp.exp()
        drop_sorted = ~in_nucleus(sorted_p, top_p)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), -1)
    noise = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in generators]).to(logits.device)
    gumbel = -torch.log(-torch.log(noise.clamp_min(1e-20)))
    tokens = (logp + gumbel).argmax(-1)  # Gumbel-max: an exact sample of softmax(logp)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


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
        keep = in_nucleus(sorted_p, top_p)
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
