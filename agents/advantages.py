"""Advantage estimators (gae, grpo, rloo, reinforce_pp), registered by name, with masked GAE and whitening.

Every estimator has one signature, `fn(data: AdvantageInput, cfg: AdvantageConfig) -> (advantages, returns)`,
both (B, T) and zero wherever `action_mask` is 0, so the trainer calls any of them the same way.
Masked tokens (prompt, padding, env-inserted `<info>` replies) are skipped, not just zeroed: inserting
any number of them between two policy tokens leaves the policy tokens' advantages unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]


def local(t: Tensor) -> Tensor:
    """The `reduce` of a single process: a sum over one rank is the tensor itself."""
    return t


@dataclass
class AdvantageInput:
    """What every estimator receives; (B, T) tensors are aligned with `input_ids`.

    token_rewards: (B, T) outcome reward on the last action token, plus any per-token KL penalty the
        trainer already added (KL placement "reward").
    action_mask: (B, T) float or bool, 1 where the policy generated the token.
    values: (B, T) critic values, or None for critic-free estimators.
    group_ids: (B,) long, equal for the samples of one prompt (see `grpo_group_ids`).
    reduce: sums a tensor over data-parallel ranks (the trainer passes its all-reduce; `local` alone).
    """

    token_rewards: Tensor
    action_mask: Tensor
    values: Tensor | None
    group_ids: Tensor
    reduce: Reduce = local


@dataclass
class AdvantageConfig:
    """Knobs shared by the estimators; each estimator reads only the ones it needs."""

    gamma: float = 1.0  # discount per action token (gae, reinforce_pp)
    lam: float = 1.0  # GAE lambda: 1 = Monte-Carlo returns minus V, 0 = one-step TD (gae)
    whiten: bool = True  # whiten GAE advantages over all action tokens of the batch, across ranks (gae)
    grpo_norm_std: bool = True  # divide by the group std; False = Dr.GRPO (grpo)
    eps: float = 1e-6  # added to standard deviations before dividing

    def __post_init__(self) -> None:
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"AdvantageConfig.{name} must lie in [0, 1], got {name}={value!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"AdvantageConfig.eps must be > 0, got eps={self.eps!r}")
        for name in ("whiten", "grpo_norm_std"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"AdvantageConfig.{name} must be a bool, got {name}={getattr(self, name)!r}")


EstimatorFn = Callable[[AdvantageInput, AdvantageConfig], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator. `needs_critic`: the trainer builds a critic and fills `values`.
    `outcome_only`: reads only each sequence's summed reward, so a per-token reward term (a KL
    penalty in the reward) loses its token placement and is folded into one score per sequence.
    `groups`: compares the episodes of one prompt, so it needs `rollout.n_per_prompt >= 2`."""

    name: str
    fn: EstimatorFn
    needs_critic: bool
    outcome_only: bool = False
    groups: bool = False


_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage(
    name: str, needs_critic: bool, outcome_only: bool = False, groups: bool = False
) -> Callable[[EstimatorFn], EstimatorFn]:
    """Decorator adding `fn(data, cfg) -> (advantages, returns)` to the registry under `name`."""

    def deco(fn: EstimatorFn) -> EstimatorFn:
        if name in _ESTIMATORS:
            taken_by = _ESTIMATORS[name].fn.__qualname__
            raise ValueError(f"advantage estimator {name!r} is already registered (by {taken_by})")
        _ESTIMATORS[name] = AdvantageEstimator(name, fn, needs_critic, outcome_only, groups)
        return fn

    return deco


def get_advantage(name: str) -> AdvantageEstimator:
    """The estimator registered under `name` (config key `algorithm.advantage`)."""
    if name not in _ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r} (algorithm.advantage); "
                         f"known: {', '.join(sorted(_ESTIMATORS))}")
    return _ESTIMATORS[name]


# ---------------------------------------------------------------------------------------------
# Masked statistics over the whole batch; `reduce` sums over data-parallel ranks


def masked_mean(x: Tensor, mask: Tensor, reduce: Reduce = local) -> Tensor:
    """Mean of x over positions where mask is 1, over the whole batch on all ranks; scalar tensor.

    Sums and counts are reduced (summed over ranks) before dividing, so unequal token counts per rank
    are weighted correctly.
    """
    mask = mask.to(x.dtype)
    sums = reduce(torch.stack([(x * mask).sum(), mask.sum()]))
    if sums[1] <= 0:
        raise ValueError("masked_mean: the mask selects no position on any rank")
    return sums[0] / sums[1]


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, reduce: Reduce = local) -> Tensor:
    """Variance of x over positions where mask is 1, across ranks; scalar tensor.

    Unbiased (divides by n - 1, like `torch.var`) by default; needs n >= 2 selected positions.
    """
    mean = masked_mean(x, mask, reduce)
    mask = mask.to(x.dtype)
    sums = reduce(torch.stack([((x - mean) ** 2 * mask).sum(), mask.sum()]))
    n = sums[1]
    if unbiased:
        if n < 2:
            raise ValueError(f"masked_var: unbiased variance needs >= 2 masked positions, got {int(n)}")
        return sums[0] / (n - 1)
    return sums[0] / n


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-6, shift_mean: bool = True,
                  reduce: Reduce = local) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean and unbiased var over masked positions of all ranks.

    With shift_mean=False the mean is added back (only the scale changes). Values at masked-out
    positions are transformed too; multiply by the mask to zero them.
    """
    mean, var = masked_mean(x, mask, reduce), masked_var(x, mask, reduce=reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


# ---------------------------------------------------------------------------------------------
# Masked GAE


def compute_gae(
    rewards: Tensor, values: Tensor, action_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation over action tokens only (Schulman et al. 2016, eq. 16).

    rewards, values, action_mask: (B, T). Walking t from T-1 down to 0,
        delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next,
    where V_next and A_next belong to the next *action* token: they are updated only where the mask
    is 1, so masked tokens (their rewards and values included) are skipped as if absent. After the
    last action token V_next = A_next = 0.
    Returns (advantages, returns), both (B, T): advantages = A_t, returns = A_t + V_t (the critic's
    target) on action tokens, and both 0 on masked tokens.
    """
    if not (rewards.shape == values.shape == action_mask.shape) or rewards.dim() != 2:
        shapes = [tuple(t.shape) for t in (rewards, values, action_mask)]
        raise ValueError(f"compute_gae needs one (B, T) shape for rewards, values, action_mask; got {shapes}")
    mask = action_mask.bool()
    values = values.to(rewards.dtype)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,) V of the next action token
    next_adv = torch.zeros_like(rewards[:, 0])  # (B,) A of the next action token
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD residual
        adv = delta + gamma * lam * next_adv  # GAE recursion, eq. 16
        next_value = torch.where(m, values[:, t], next_value)  # masked tokens do not move the carry
        next_adv = torch.where(m, adv, next_adv)
        advantages[:, t] = torch.where(m, adv, torch.zeros_like(adv))
    returns = torch.where(mask, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


# ---------------------------------------------------------------------------------------------
# Group statistics for GRPO / RLOO (groups never straddle ranks, so these are local)


def _check_input(data: AdvantageInput, name: str, need_values: bool = False) -> None:
    r, m = data.token_rewards, data.action_mask
    if r.dim() != 2 or r.shape != m.shape:
        raise ValueError(f"{name}: token_rewards {tuple(r.shape)} and action_mask {tuple(m.shape)} "
                         f"must be one (B, T) shape")
    if need_values and (data.values is None or data.values.shape != r.shape):
        got = None if data.values is None else tuple(data.values.shape)
        raise ValueError(f"{name}: needs values of shape {tuple(r.shape)} (a critic), got {got}")
    if data.group_ids is None or data.group_ids.shape != (r.shape[0],):
        got = None if data.group_ids is None else tuple(data.group_ids.shape)
        raise ValueError(f"{name}: group_ids must have shape ({r.shape[0]},), got {got}")


def _group_stats(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (sum over its group, size of its group, unbiased std of its group); scores: (B,).

    A group of one sample has no baseline: that is an error naming the group id.
    """
    uniq, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        lonely = uniq[counts < 2].tolist()
        raise ValueError(f"group ids {lonely} have a single sample; group baselines need >= 2 per group "
                         f"(rollout.n_per_prompt >= 2)")
    sums = torch.zeros(len(uniq), dtype=scores.dtype, device=scores.device).index_add_(0, inverse, scores)
    n = counts.to(scores.dtype)
    mean = sums / n
    sq_dev = torch.zeros_like(sums).index_add_(0, inverse, (scores - mean[inverse]) ** 2)
    std = torch.sqrt(sq_dev / (n - 1))  # unbiased, like torch.std
    return sums[inverse], n[inverse], std[inverse]


def _broadcast_over_actions(per_seq: Tensor, action_mask: Tensor) -> Tensor:
    """(B,) -> (B, T): the sequence's value on every action token, 0 elsewhere."""
    return per_seq[:, None] * action_mask.to(per_seq.dtype)


# ---------------------------------------------------------------------------------------------
# Estimators


@register_advantage("gae", needs_critic=True)
def gae_advantage(data: AdvantageInput, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """PPO's estimator: masked GAE with a critic, then (cfg.whiten) advantages whitened over all action
    tokens of the batch across ranks. Returns are GAE returns, computed before whitening."""
    _check_input(data, "gae", need_values=True)
    advantages, returns = compute_gae(data.token_rewards, data.values, data.action_mask, cfg.gamma, cfg.lam)
    if cfg.whiten:
        mask = data.action_mask.to(advantages.dtype)
        advantages = masked_whiten(advantages, mask, cfg.eps, reduce=data.reduce) * mask
    return advantages, returns


@register_advantage("grpo", needs_critic=False, outcome_only=True, groups=True)
def grpo_advantage(data: AdvantageInput, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """GRPO (Shao et al. 2024, DeepSeekMath sec. 4.1.2): R_i = sum_t r_{i,t} over the whole row (the
    outcome reward), A_i = (R_i - mean_g) / (std_g + eps) within the prompt's group g, broadcast over
    the action tokens. cfg.grpo_norm_std=False gives Dr.GRPO's A_i = R_i - mean_g (Liu et al. 2025,
    "Understanding R1-Zero-Like Training"). Returns = advantages."""
    _check_input(data, "grpo")
    scores = data.token_rewards.sum(dim=-1)  # (B,)
    group_sum, group_n, group_std = _group_stats(scores, data.group_ids)
    adv = scores - group_sum / group_n
    if cfg.grpo_norm_std:
        adv = adv / (group_std + cfg.eps)
    advantages = _broadcast_over_actions(adv, data.action_mask)
    return advantages, advantages


@register_advantage("rloo", needs_critic=False, outcome_only=True, groups=True)
def rloo_advantage(data: AdvantageInput, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics", eq. 5): the baseline of sample i
    is the mean outcome of the other samples of its group, A_i = R_i - (sum_g - R_i) / (n_g - 1),
    broadcast over the action tokens. Returns = advantages."""
    _check_input(data, "rloo")
    scores = data.token_rewards.sum(dim=-1)  # (B,)
    group_sum, group_n, _ = _group_stats(scores, data.group_ids)
    adv = scores - (group_sum - scores) / (group_n - 1)  # leave-one-out baseline
    advantages = _broadcast_over_actions(adv, data.action_mask)
    return advantages, advantages


@register_advantage("reinforce_pp", needs_critic=False)
def reinforce_pp_advantage(data: AdvantageInput, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025, "REINFORCE++", sec. 3): discounted return-to-go of the per-token rewards
    over action tokens only (G_t = r_t + gamma * G_next; masked tokens skipped), then whitened over all
    action tokens of the batch across ranks. This is masked GAE with V = 0 and lambda = 1, so cfg.lam
    is not read. Returns (advantages = whitened G, returns = raw G)."""
    _check_input(data, "reinforce_pp")
    zeros = torch.zeros_like(data.token_rewards)
    returns, _ = compute_gae(data.token_rewards, zeros, data.action_mask, cfg.gamma, 1.0)
    advantages = masked_whiten(returns, data.action_mask, cfg.eps, reduce=data.reduce) * data.action_mask.to(returns.dtype)
    return advantages, returns


# ---------------------------------------------------------------------------------------------
# Group ids (assigned before the prompts are repeated)

Item = TypeVar("Item")


def grpo_group_ids(n_prompts: int, n_per_prompt: int) -> Tensor:
    """Group ids for a batch built by `repeat_for_group`: (n_prompts * n_per_prompt,) long,
    [0]*n + [1]*n + ..., so sample k answers prompt k // n_per_prompt.

    Ids are derived from the prompt index before repetition; assigning fresh ids to the already
    repeated batch (as Router-R1's verl fork does) puts every sample in a group of its own.
    """
    for name, v in (("n_prompts", n_prompts), ("n_per_prompt", n_per_prompt)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return torch.arange(n_prompts, dtype=torch.long).repeat_interleave(n_per_prompt)


def repeat_for_group(items: Sequence[Item], n: int) -> list[Item]:
    """Each item repeated n times contiguously ([a, b], 2 -> [a, a, b, b]), as `grpo_group_ids` assumes."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (rollout.n_per_prompt) must be an int >= 1, got {n!r}")
    return [item for item in items for _ in range(n)]
