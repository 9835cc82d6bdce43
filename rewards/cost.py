"""Raw call cost and the cost normalizers that map it to a score in [0, 1] (1 = cheapest)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Protocol

import numpy as np

_CALL_FIELDS = ("prompt_tokens", "completion_tokens", "price_per_1m_input", "price_per_1m_output")


def _field(call: Any, key: str, index: int) -> float:
    value = call.get(key) if isinstance(call, Mapping) else getattr(call, key, None)
    if value is None:
        raise ValueError(f"call {index} has no {key!r} (needs {', '.join(_CALL_FIELDS)})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"call {index}: {key}={value!r} must be a finite number >= 0")
    return float(value)


def call_cost(prompt_tokens: float, completion_tokens: float, price_per_1m_input: float,
              price_per_1m_output: float) -> float:
    """One call's cost in micro-dollars: `completion_tokens * price_per_1m_output + prompt_tokens *
    price_per_1m_input` (prices per 1M tokens, not divided)."""
    return completion_tokens * price_per_1m_output + prompt_tokens * price_per_1m_input


def raw_cost(calls: Iterable[Any]) -> float:
    """Sum over calls of `call_cost`.

    Prices are per million tokens and are not divided, so the unit is micro-dollars. With input
    prices 0 this is the cost the Router-R1 paper reports. Calls are mappings or objects with the
    four fields.
    """
    total = 0.0
    for i, call in enumerate(calls):
        total += call_cost(*(_field(call, key, i) for key in _CALL_FIELDS))
    return total


def affordable_tokens(spent: float, cap: float, prompt_tokens: int, price_per_1m_input: float,
                      price_per_1m_output: float, limit: int) -> int:
    """The most completion tokens (at most `limit`) a call may take so that `spent` plus its cost
    stays within `cap`, its priced prompt tokens paid first; 0 when not even those fit. Checked in
    the same float arithmetic as the ledger's sum, so the sum never passes the cap by a rounding."""
    prompt_cost = call_cost(prompt_tokens, 0, price_per_1m_input, 0.0)
    if spent + prompt_cost > cap:
        return 0
    left = cap - spent - prompt_cost
    if price_per_1m_output <= 0 or left >= limit * price_per_1m_output:
        n = limit
    else:  # left / price is below limit here, finite even for a tiny price
        n = max(0, math.floor(left / price_per_1m_output))
    while n > 0 and spent + call_cost(prompt_tokens, n, price_per_1m_input, price_per_1m_output) > cap:
        n -= 1  # a float rounding above the cap
    return n


class CostNormalizer(Protocol):
    """Maps a raw cost to a score in [0, 1]; `score` is pure, `update` feeds observed costs."""

    def update(self, raw_costs: Iterable[float]) -> None: ...
    def score(self, raw: float) -> float: ...
    def __call__(self, raw: float) -> float: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def _check_cost(raw: float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw < 0:
        raise ValueError(f"raw cost must be a finite number >= 0, got {raw!r}")
    return float(raw)


_NORMALIZERS: dict[str, Callable[..., "CostNormalizer"]] = {}


def register_cost_normalizer(name: str):
    def deco(cls):
        if name in _NORMALIZERS:
            raise ValueError(f"cost normalizer {name!r} is already registered")
        cls.kind = name
        _NORMALIZERS[name] = cls
        return cls
    return deco


def make_cost_normalizer(name: str, **options: Any) -> "CostNormalizer":
    """Build a normalizer by name: "router_r1" (window=1000), "budget" (budget=...), "none"."""
    if name not in _NORMALIZERS:
        raise ValueError(f"unknown cost normalizer {name!r}; known: {', '.join(sorted(_NORMALIZERS))}")
    return _NORMALIZERS[name](**options)


class _Base:
    kind = ""

    def update(self, raw_costs: Iterable[float]) -> None:
        for raw in raw_costs:
            _check_cost(raw)

    def __call__(self, raw: float) -> float:
        """The paper's per-sample behaviour: update with this cost, then score it."""
        self.update([raw])
        return self.score(raw)

    def state_dict(self) -> dict:
        return {"kind": self.kind}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"state of cost normalizer {state.get('kind')!r} loaded into {self.kind!r}")


@register_cost_normalizer("router_r1")
class RouterR1Normalizer(_Base):
    """Router-R1's sliding-window percentile scaling of sqrt(cost).

    `update` appends sqrt(raw) of each cost to a window of the last `window` values. `score(raw)`
    is `1 - clip((sqrt(raw) - lo) / (hi - lo), 0, 1)` with lo, hi the 5th and 95th percentiles of
    the window (numpy's linear interpolation); 0.5 when the window is empty or hi - lo < 1e-8.

    With alpha drawn per question (a conditioned policy) one window pools the costs of every
    alpha: the score of a cost then depends on the mix of alphas in recent batches and on what the
    policy spends at each, so low-alpha episodes that call the expensive candidates widen the scale
    and make every cheap call score alike for the high-alpha ones. `budget` has a fixed scale, so a
    cost scores the same whatever the mix.
    """

    def __init__(self, window: int = 1000, low_pct: float = 5.0, high_pct: float = 95.0):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if not 0 <= low_pct < high_pct <= 100:
            raise ValueError(f"need 0 <= low_pct < high_pct <= 100, got {low_pct}, {high_pct}")
        self.window, self.low_pct, self.high_pct = window, low_pct, high_pct
        self._values: deque[float] = deque(maxlen=window)

    def update(self, raw_costs: Iterable[float]) -> None:
        for raw in raw_costs:
            self._values.append(math.sqrt(_check_cost(raw)))

    def score(self, raw: float) -> float:
        r = math.sqrt(_check_cost(raw))
        if not self._values:
            return 0.5
        lo, hi = np.percentile(np.fromiter(self._values, float), [self.low_pct, self.high_pct])
        if hi - lo < 1e-8:
            return 0.5
        return float(1.0 - np.clip((r - lo) / (hi - lo), 0.0, 1.0))

    def state_dict(self) -> dict:
        return {"kind": self.kind, "window": self.window, "low_pct": self.low_pct,
                "high_pct": self.high_pct, "values": list(self._values)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.window, self.low_pct, self.high_pct = state["window"], state["low_pct"], state["high_pct"]
        self._values = deque((float(v) for v in state["values"]), maxlen=self.window)


@register_cost_normalizer("budget")
class BudgetNormalizer(_Base):
    """A fixed cost scale: `1 - min(raw / budget, 1)`; `update` does nothing."""

    def __init__(self, budget: float):
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise ValueError(f"budget must be a number > 0, got {budget!r}")
        self.budget = float(budget)

    def score(self, raw: float) -> float:
        return 1.0 - min(_check_cost(raw) / self.budget, 1.0)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "budget": self.budget}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.budget = float(state["budget"])


@register_cost_normalizer("none")
class NoCostNormalizer(_Base):
    """Cost plays no part: the score is always 0.0."""

    def score(self, raw: float) -> float:
        _check_cost(raw)
        return 0.0
