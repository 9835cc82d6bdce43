"""Per-token policy (PPO), value and KL losses, their aggregation over an optimizer step, the actor's
and the critic's objective for one micro-batch, KL placement checks.

Every loss here is per token, (B, T); `agg_loss` alone reduces to a scalar, dividing by a count taken
over the whole optimizer step (all micro-batches, all ranks) so that how the step is split cannot
change the result. Nothing here communicates: the one count that spans ranks takes a `reduce`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from agents.advantages import Reduce, get_advantage, local
from agents.kl import KL_ESTIMATORS, LOG_RATIO_CLAMP, kl_estimate

KL_PLACEMENTS = ("reward", "loss", "none")


@dataclass(frozen=True)
class LossAggregation:
    """A way to reduce a per-token loss over an optimizer step: `numerator(masked_loss, mask)` sums
    this micro-batch's part, and the step's denominator counts its action tokens (`per="token"`) or
    its sequences with at least one action token (`per="sequence"`)."""

    name: str
    numerator: Callable[[Tensor, Tensor], Tensor]
    per: str


LOSS_AGGREGATIONS: dict[str, LossAggregation] = {}


def register_loss_agg(name: str, per: str):
    """Register `numerator(masked_loss (B, T), mask (B, T)) -> scalar` under `name` (`algorithm.loss_agg`)."""
    if per not in ("token", "sequence"):
        raise ValueError(f"loss aggregation {name!r}: per={per!r} must be 'token' or 'sequence'")

    def deco(fn):
        if name in LOSS_AGGREGATIONS:
            raise ValueError(f"loss aggregation {name!r} is already registered")
        LOSS_AGGREGATIONS[name] = LossAggregation(name, fn, per)
        return fn
    return deco


@register_loss_agg("token-mean", per="token")
def token_mean(masked_loss: Tensor, mask: Tensor) -> Tensor:
    """sum over the step's action tokens / their count."""
    return masked_loss.sum(dim=-1).sum()


@register_loss_agg("seq-mean-token-mean", per="sequence")
def seq_mean_token_mean(masked_loss: Tensor, mask: Tensor) -> Tensor:
    """sum_i [sum_t loss_i,t / n_i] / sequences in the step (a sequence with no action token adds 0)."""
    return (masked_loss.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)).sum()


@register_loss_agg("seq-mean-token-sum", per="sequence")
def seq_mean_token_sum(masked_loss: Tensor, mask: Tensor) -> Tensor:
    """sum_i sum_t loss_i,t / sequences in the step."""
    return masked_loss.sum(dim=-1).sum()



def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float = 0.2, dual_clip: float | None = None
) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate per token (Schulman et al. 2017, "Proximal Policy Optimization", eq. 7).

    logp, old_logp, advantages: (B, T). With ratio = exp(logp - old_logp),
        loss = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps)).
    dual_clip = c > 1 (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5) also caps the
    loss at -c * A where A < 0, so a huge ratio on a bad action cannot blow the loss up.
    Returns (loss (B, T), clip_frac (B, T) float: 1 where the clipped term was the larger one).
    The log-ratio is clamped to [-20, 20] before exp.
    """
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got clip_eps={clip_eps!r}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got dual_clip={dual_clip!r}")
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(unclipped, clipped)  # pessimistic bound, eq. 7
    clip_frac = (clipped > unclipped).to(loss.dtype)
    if dual_clip is not None:
        capped = torch.minimum(loss, -dual_clip * advantages)  # dual clip, only for A < 0
        loss = torch.where(advantages < 0, capped, loss)
    return loss, clip_frac


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip_eps: float | None = 0.5) -> Tensor:
    """Clipped value loss per token: 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2).

    values, old_values, returns: (B, T) -> (B, T). The clipped term keeps the critic near the one that
    produced the rollout, as in PPO's reference implementation; clip_eps=None gives 0.5 * (V - R)^2.
    """
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * unclipped
    if not clip_eps > 0:
        raise ValueError(f"value clip_eps must be > 0 or None, got clip_eps={clip_eps!r}")
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return 0.5 * torch.maximum(unclipped, (values_clipped - returns) ** 2)


def kl_loss(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token KL(pi || ref) estimate used as a loss term ("KL in loss", as in GRPO); (B, T) -> (B, T).

    Call `validate_kl_placement` once at start-up: k1 is refused here.
    """
    return kl_estimate(logp, ref_logp, kind)


def _aggregation(mode: str) -> LossAggregation:
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; known: {', '.join(LOSS_AGGREGATIONS)}")
    return LOSS_AGGREGATIONS[mode]


def agg_loss(loss: Tensor, mask: Tensor, mode: str, denominator: float) -> Tensor:
    """Reduce a per-token loss (B, T) to a scalar: the mode's numerator over `denominator`, which
    comes from `step_denominator` (see the registered modes above).

    Because the denominator counts the whole optimizer step, summing this over the step's
    micro-batches and ranks gives the full-batch loss exactly. DeepSpeed and DDP instead *average*
    gradients over gradient-accumulation steps and ranks, so the caller multiplies this loss by
    (grad_accum_steps * world_size) before backward when the engine divides by them; then the
    effective loss does not depend on how the step is split.
    """
    agg = _aggregation(mode)
    if loss.shape != mask.shape:
        raise ValueError(f"loss shape {tuple(loss.shape)} != mask shape {tuple(mask.shape)}")
    if not denominator > 0:
        raise ValueError(f"denominator must be > 0, got {denominator!r} (use step_denominator)")
    mask = mask.to(loss.dtype)
    return agg.numerator(loss * mask, mask) / denominator


def step_denominator(masks: list[Tensor], mode: str, reduce: Reduce = local) -> float:
    """The `agg_loss` denominator for one optimizer step made of these micro-batch masks (each (b, T)).

    token-mean counts action tokens; the seq-mean-* modes count sequences with at least one action
    token. `reduce` sums the count over data-parallel ranks, so every rank must call this with its own
    micro-batches of the same step.
    """
    agg = _aggregation(mode)
    if len(masks) == 0:
        raise ValueError("step_denominator needs the masks of at least one micro-batch")
    if agg.per == "token":
        count = sum(m.to(torch.float64).sum() for m in masks)
    else:
        count = sum((m.to(torch.float64).sum(dim=-1) > 0).to(torch.float64).sum() for m in masks)
    total = float(reduce(count.reshape(1)).item())
    if total <= 0:
        raise ValueError(f"no action tokens in this optimizer step (mode {mode!r}): nothing to train on")
    return total


def actor_objective(
    logp: Tensor, entropy: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, ref_logp: Tensor | None, *,
    mode: str, denominator: float, clip_eps: float, dual_clip: float | None, entropy_coef: float,
    kl_coef: float, kl_estimator: str,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The actor's loss on one micro-batch and its statistics; every argument tensor is (B, T).

        L = agg(PPO clipped surrogate) - entropy_coef * agg(entropy) [+ kl_coef * agg(KL(pi || ref))]

    with the KL term only when `ref_logp` is given (KL placed in the loss). Statistics, per action
    token: the surrogate (aggregated like the loss), the entropy, the clipped fraction, and
    KL(old || new) by Schulman's k3 estimator, as cleanrl reports it.
    """
    pg, clipped = policy_loss(logp, old_logp, advantages, clip_eps, dual_clip)
    loss = agg_loss(pg, mask, mode, denominator)
    loss = loss - entropy_coef * agg_loss(entropy, mask, mode, denominator)
    if ref_logp is not None:
        loss = loss + kl_coef * agg_loss(kl_loss(logp, ref_logp, kl_estimator), mask, mode, denominator)
    with torch.no_grad():
        log_ratio = (logp - old_logp) * mask
        n_act = mask.sum().clamp(min=1)
        stats = {"actor/pg_loss": agg_loss(pg, mask, mode, denominator),
                 "actor/entropy": (entropy * mask).sum() / n_act,
                 "actor/clip_frac": (clipped * mask).sum() / n_act,
                 "actor/approx_kl": ((log_ratio.exp() - 1) - log_ratio).mul(mask).sum() / n_act}
    return loss, stats


def critic_objective(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
    mode: str, denominator: float, value_clip: float | None, vf_coef: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The critic's loss on one micro-batch, vf_coef * agg(clipped value loss), and its statistics."""
    loss = vf_coef * agg_loss(value_loss(values, old_values, returns, value_clip), mask, mode, denominator)
    return loss, {"critic/value_loss": loss.detach()}


def validate_kl_placement(placement: str, estimator_kind: str, advantage_name: str) -> None:
    """Refuse KL settings that silently do nothing or do the wrong thing; call before training starts.

    - placement must be "reward" (penalty added to token_rewards), "loss" (kl_loss added to the loss)
      or "none";
    - k1 in the loss: its gradient has zero expectation under samples of the policy, so it does not
      pull the policy towards the reference;
    - KL in the reward with an outcome-only estimator (grpo, rloo): they read only each sequence's
      summed reward, so the per-token penalty would lose its placement, folded into the outcome and
      then normalised within the group.
    """
    if placement not in KL_PLACEMENTS:
        known = ", ".join(KL_PLACEMENTS)
        raise ValueError(f"algorithm.kl.placement={placement!r} is unknown; choose one of {known}")
    if placement == "none":
        return
    if estimator_kind not in KL_ESTIMATORS:
        known = ", ".join(KL_ESTIMATORS)
        raise ValueError(f"algorithm.kl.estimator={estimator_kind!r} is unknown; choose one of {known}")
    if placement == "loss" and estimator_kind == "k1":
        raise ValueError("algorithm.kl.estimator='k1' cannot be a loss term: its gradient has zero "
                         "expectation under the policy's samples; set algorithm.kl.estimator to 'k3' "
                         "(or 'k2'), or algorithm.kl.placement to 'reward'")
    estimator = get_advantage(advantage_name)
    if placement == "reward" and estimator.outcome_only:
        raise ValueError(f"algorithm.kl.placement='reward' does not work with algorithm.advantage="
                         f"{advantage_name!r}: it reads only each sequence's summed reward, so the per-token "
                         f"KL penalty would be folded into the outcome and lose its token placement; set "
                         f"algorithm.kl.placement to 'loss' (with algorithm.kl.estimator 'k3' or 'k2')")
