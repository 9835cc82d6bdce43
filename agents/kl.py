"""Per-token KL estimators k1/k2/k3 between policy and reference, and the KL coefficient controllers."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# Beyond this log-ratio the estimators saturate: exp(20) ~ 5e8 is far past any useful penalty.
LOG_RATIO_CLAMP = 20.0

KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}


def register_kl(name: str):
    """Register `fn(logp, ref_logp) -> per-token estimate` under `name` (config `algorithm.kl.estimator`)."""
    def deco(fn):
        if name in KL_ESTIMATORS:
            raise ValueError(f"KL estimator {name!r} is already registered")
        KL_ESTIMATORS[name] = fn
        return fn
    return deco


@register_kl("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = x with x = logp - ref_logp: unbiased for KL(pi || ref) under samples of pi, high variance,
    can be negative (Schulman, "Approximating KL divergence", 2020)."""
    return logp - ref_logp


@register_kl("k2")
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = x^2 / 2: biased, low variance, always >= 0 (same blog post)."""
    x = logp - ref_logp
    return 0.5 * x * x


@register_kl("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(-x) - 1 + x = (r - 1) - log r with r = ref/pi: unbiased and always >= 0 (same blog post).

    x is clamped to [-20, 20] first so exp cannot overflow; past the clamp the estimate is constant
    (no gradient) rather than pushing x the wrong way.
    """
    x = (logp - ref_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(-x) - 1.0 + x


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate of kind "k1", "k2" or "k3"; logp, ref_logp: (B, T) -> (B, T).

    Masking is the caller's job: positions outside `action_mask` carry meaningless values.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; known: {', '.join(KL_ESTIMATORS)}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp shape {tuple(logp.shape)} != ref_logp shape {tuple(ref_logp.shape)}")
    return KL_ESTIMATORS[kind](logp, ref_logp)


def _check_nonneg(name: str, value: float, strict: bool = False) -> float:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < 0 or (strict and value == 0):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} 0, got {value!r}")
    return float(value)


class FixedKLController:
    """A constant KL coefficient; `update` does nothing."""

    def __init__(self, beta: float):
        self.value = _check_nonneg("beta", beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = _check_nonneg("state['value']", state["value"])


class AdaptiveKLController:
    """KL coefficient steered towards a target KL (Ziegler et al. 2019, "Fine-Tuning Language Models
    from Human Preferences", sec. 2.2).

    After each batch: beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon, so beta grows
    when the measured KL is above target and shrinks when below, by at most 20% per horizon of steps.
    """

    def __init__(self, init_beta: float, target: float, horizon: int):
        self.value = _check_nonneg("init_beta", init_beta)
        self.target = _check_nonneg("target", target, strict=True)
        self.horizon = _check_nonneg("horizon", horizon, strict=True)

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: mean per-sequence KL of the batch; n_steps: samples (or steps) it covered."""
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl!r}")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon  # Ziegler et al. 2019, sec. 2.2

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = _check_nonneg("state['value']", state["value"])
        self.target = _check_nonneg("state['target']", state.get("target", self.target), strict=True)
        self.horizon = _check_nonneg("state['horizon']", state.get("horizon", self.horizon), strict=True)
