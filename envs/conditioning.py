"""Per-question routing conditions: the cost weight `alpha` and the spending cap `max_cost`, each given
as a number, a set to sample from (`{sample: [...]}`) or a range (`{low: .., high: ..}`), checked when
a config is read and drawn per prompt from a stream keyed by (seed, step, prompt index). A cap of
infinity (`.inf` in YAML) is no cap: in a sample set it draws questions whose prompt states no budget,
so one policy learns to answer with and without one."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

Spec = Any  # a number, {"sample": [numbers]} or {"low": number, "high": number}; None where allowed
RANGE_DECIMALS = 2  # a range is drawn in steps of 0.01, the precision the prompt shows


def stream_key(*parts: Any) -> int:
    """The 63-bit key of a random stream named by `parts`, e.g. (seed, step, episode index): the same
    parts give the same stream on any rank and in any batch layout."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _check_number(key: str, value: Any, unit: bool, inf_ok: bool = False) -> float:
    """One value: a finite number, in [0, 1] for a weight (`unit`) or > 0 for a cap; infinity (no cap)
    where `inf_ok`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or (math.isinf(value) and not (inf_ok and not unit and value > 0)):
        raise ValueError(f"{key}={value!r} must be a number" + (" (or .inf: no cap)" if inf_ok and not unit else ""))
    if unit and not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}={value!r} must lie in [0, 1]")
    if not unit and not value > 0:
        raise ValueError(f"{key}={value!r} must be > 0 (micro-dollars per question)")
    return float(value)


def check_spec(key: str, spec: Spec, unit: bool) -> None:
    """Refuse a bad spec with a message naming `key`: a number out of range ([0, 1] when `unit`, else
    > 0), an empty sample set, a range whose low is above its high, or any other shape."""
    if isinstance(spec, dict):
        if set(spec) == {"sample"}:
            if not isinstance(spec["sample"], list) or not spec["sample"]:
                raise ValueError(f"{key}.sample={spec['sample']!r} must be a non-empty list of numbers")
            for i, v in enumerate(spec["sample"]):
                _check_number(f"{key}.sample[{i}]", v, unit, inf_ok=True)
            return
        if set(spec) == {"low", "high"}:
            low, high = _check_number(f"{key}.low", spec["low"], unit), _check_number(f"{key}.high", spec["high"], unit)
            if low > high:
                raise ValueError(f"{key}: low={low:g} is above high={high:g}")
            return
        raise ValueError(f"{key}={spec!r} must be a number, {{sample: [...]}} or {{low: .., high: ..}}")
    _check_number(key, spec, unit, inf_ok=True)


def is_sampled(spec: Spec) -> bool:
    """True when the value is drawn per question (a sample set or a range), not fixed."""
    return isinstance(spec, dict)


def is_sample_set(spec: Spec) -> bool:
    """True when the value is drawn from a finite set (`{sample: [...]}`), not a range or a number."""
    return isinstance(spec, dict) and "sample" in spec


def spec_range(spec: Spec) -> tuple[float, float]:
    """The smallest and largest value a spec can give."""
    if isinstance(spec, dict):
        values = spec["sample"] if "sample" in spec else [spec["low"], spec["high"]]
        return float(min(values)), float(max(values))
    return float(spec), float(spec)


def largest_cap(spec: Spec) -> float | None:
    """The largest finite cap a spec can give (None when it gives only "no cap")."""
    values = spec["sample"] if is_sample_set(spec) else list(spec_range(spec))
    finite = [float(v) for v in values if math.isfinite(v)]
    return max(finite) if finite else None


def as_cap(value: float | None) -> float | None:
    """A drawn or given cap as an episode holds it: infinity is no cap (None)."""
    return None if value is None or math.isinf(value) else float(value)


def cap_for_json(spec: Spec) -> Spec:
    """A cap or its spec as strict JSON can hold it: infinity (no cap) as None (null)."""
    if isinstance(spec, dict):
        return {k: [as_cap(v) for v in vs] if isinstance(vs, list) else as_cap(vs) for k, vs in spec.items()}
    return as_cap(spec)


def spec_values(spec: Spec) -> list[float]:
    """Every value a spec can give: the number, the sample set, or a range's steps of 0.01."""
    if is_sample_set(spec):
        return sorted({float(v) for v in spec["sample"]})
    low, high = spec_range(spec)
    steps = round((high - low) * 10**RANGE_DECIMALS)
    return [round(low + i / 10**RANGE_DECIMALS, RANGE_DECIMALS) for i in range(steps + 1)]


def in_range(spec: Spec, value: float) -> bool:
    """Whether `value` lies where `spec` gives values: one of a sample set, inside a range, or equal
    to a fixed number."""
    if is_sample_set(spec):
        return any(math.isclose(value, v, abs_tol=1e-9) for v in spec["sample"])
    low, high = spec_range(spec)
    return low - 1e-9 <= value <= high + 1e-9


def draw(spec: Spec, *key: Any) -> float | None:
    """The value of `spec` for the prompt named by `key` (e.g. (seed, step, prompt index, "alpha")):
    the number itself, a uniform pick of a sample set, or a uniform draw from a range rounded to
    RANGE_DECIMALS. None stays None (no cap)."""
    if spec is None or not isinstance(spec, dict):
        return None if spec is None else float(spec)
    rng = np.random.default_rng(stream_key(*key))
    if "sample" in spec:
        return float(spec["sample"][int(rng.integers(len(spec["sample"])))])
    value = round(float(rng.uniform(spec["low"], spec["high"])), RANGE_DECIMALS)
    return min(max(value, float(spec["low"])), float(spec["high"]))
