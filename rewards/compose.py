"""The Router-R1 reward: format penalty, else quality and cost mixed by alpha when the answer is right."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

from rewards.answer import _golden_list, exact_match, extract_answer, f1_score
from rewards.cost import CostNormalizer
from rewards.format import FORMAT_PENALTY, format_reward

METRICS = {"em": exact_match, "f1": f1_score}


@dataclass(frozen=True)
class RewardBreakdown:
    """`total` is what RL optimises; `format` is 0 or -1; `outcome` is EM/F1 of the extracted answer
    (0 when malformed); `cost` is the cost score used (0.0 when the cost term was not used)."""

    total: float
    format: float
    outcome: float
    cost: float


def compute_reward(
    response: str,
    golden_answers: str | Sequence[str],
    candidate_names: Sequence[str],
    raw_cost: float,
    alpha: float,
    metric: str = "em",
    cost_normalizer: CostNormalizer | None = None,
) -> RewardBreakdown:
    """Router-R1's reward (paper eq. 4-6).

    If the format reward is -1, total = -1. Otherwise outcome = EM (or F1) of the extracted answer;
    total = (1 - alpha) * outcome + alpha * cost_score when outcome > 0, else 0. The normalizer's
    `score` is read only when that cost term is used (outcome > 0 and alpha > 0); `update` is never
    called here. `cost_normalizer=None` means the "none" normalizer (score 0).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got alpha={alpha!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    if isinstance(raw_cost, bool) or not isinstance(raw_cost, (int, float)) or not math.isfinite(raw_cost) or raw_cost < 0:
        raise ValueError(f"raw_cost must be a finite number >= 0, got {raw_cost!r}")
    _golden_list(golden_answers)  # bad golden answers are a data error even when the format fails
    fmt = format_reward(response, candidate_names)
    if fmt == FORMAT_PENALTY:
        return RewardBreakdown(FORMAT_PENALTY, FORMAT_PENALTY, 0.0, 0.0)
    answer = extract_answer(response)
    outcome = METRICS[metric](answer, golden_answers) if answer is not None else 0.0
    if outcome <= 0:
        return RewardBreakdown(0.0, fmt, outcome, 0.0)
    cost_score = cost_normalizer.score(raw_cost) if (cost_normalizer is not None and alpha > 0) else 0.0
    total = (1 - alpha) * outcome + alpha * cost_score  # paper eq. 6
    return RewardBreakdown(total, fmt, outcome, cost_score)


def load_reward_fn(spec: str | None) -> Callable:
    """`module:function` with rewards.compute_reward's signature, or the paper's reward."""
    if not spec:
        return compute_reward
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward_fn={spec!r} could not be loaded ({e}); expected 'module:function'") from None
