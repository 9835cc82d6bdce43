"""Per-token policy (PPO), value and KL losses, their aggregation over an optimizer step, KL placement checks.

Every loss here is per token, (B, T); `agg_loss` alone reduces to a scalar, dividing by a count taken
over the whole optimizer step (all micro-batches, all ranks) so that how the step is split cannot
change the result.
"""

from __future__ import annotations

import torch
from torch import Tensor

from agents.advantages import get_advantage
from agents.collectives import all_reduce
from agents.kl import KL_ESTIMATORS, LOG_RATIO_CLAMP, kl_estimate

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_PLACEMENTS = ("reward", "loss", "none")


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


def _check_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; known: {', '.join(LOSS_AGG_MODES)}")


def agg_loss(loss: Tensor, mask: Tensor, mode: str, denominator: float) -> Tensor:
    """Reduce a per-token loss (B, T) to a scalar; `denominator` comes from `step_denominator`.

    token-mean:          sum(loss * mask) / denominator (action tokens in the step)
    seq-mean-token-mean: sum_i [sum_t(loss * mask)_i / n_i] / denominator (sequences in the step)
    seq-mean-token-sum:  sum_i sum_t(loss * mask)_i / denominator (sequences in the step)
    where n_i is sequence i's action-token count; a sequence with no action token contributes 0.

    Because the denominator counts the whole optimizer step, summing this over the step's
    micro-batches and ranks gives the full-batch loss exactly. DeepSpeed and DDP instead *average*
    gradients over gradient-accumulation steps and ranks, so the caller multiplies this loss by
    (grad_accum_steps * world_size) before backward when the engine divides by them; then the
    effective loss does not depend on how the step is split.
    """
    _check_mode(mode)
    if loss.shape != mask.shape:
        raise ValueError(f"loss shape {tuple(loss.shape)} != mask shape {tuple(mask.shape)}")
    if not denominator > 0:
        raise ValueError(f"denominator must be > 0, got {denominator!r} (use step_denominator)")
    mask = mask.to(loss.dtype)
    per_seq_sum = (loss * mask).sum(dim=-1)  # (B,)
    if mode == "token-mean":
        return per_seq_sum.sum() / denominator
    if mode == "seq-mean-token-mean":
        n_tokens = mask.sum(dim=-1)
        per_seq_mean = per_seq_sum / n_tokens.clamp(min=1.0)  # a sequence with no action token has sum 0
        return per_seq_mean.sum() / denominator
    return per_seq_sum.sum() / denominator


def step_denominator(masks: list[Tensor], mode: str) -> float:
    """The `agg_loss` denominator for one optimizer step made of these micro-batch masks (each (b, T)).

    token-mean counts action tokens; the seq-mean-* modes count sequences with at least one action
    token. When torch.distributed is initialized the count is summed over ranks, so every rank must
    call this with its own micro-batches of the same step.
    """
    _check_mode(mode)
    if len(masks) == 0:
        raise ValueError("step_denominator needs the masks of at least one micro-batch")
    if mode == "token-mean":
        count = sum(m.to(torch.float64).sum() for m in masks)
    else:
        count = sum((m.to(torch.float64).sum(dim=-1) > 0).to(torch.float64).sum() for m in masks)
    total = float(all_reduce(count.reshape(1), "sum").item())
    if total <= 0:
        raise ValueError(f"no action tokens in this optimizer step (mode {mode!r}): nothing to train on")
    return total


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
