"""Aggregate router metrics: EM/F1/cost summaries, AIQ, Routing Score, PGR/APGR/CPT, bootstrap intervals."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import numpy as np

_RECORD_FIELDS = ("em", "f1", "raw_cost", "full_cost", "calls")


# ---------------------------------------------------------------------------
# Per-question records -> summary table rows
# ---------------------------------------------------------------------------

def _record_number(record: Mapping[str, Any], key: str, index: int) -> float:
    if key not in record:
        raise ValueError(f"record {index} has no {key!r} (needs {', '.join(_RECORD_FIELDS)}, 'format_ok')")
    value = record[key]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ValueError(f"record {index}: {key}={value!r} must be a finite number")
    return float(value)


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means over questions of EM, F1, raw cost, full cost and calls, plus the format-error rate.

    Every record needs `em`, `f1`, `raw_cost`, `full_cost`, `calls` (numbers) and `format_ok`
    (bool). Returns keys `em`, `f1`, `raw_cost`, `full_cost`, `calls_per_question`,
    `format_error_rate` (share of records with `format_ok` False) and `n`.
    """
    if len(records) == 0:
        raise ValueError("summarize needs at least one record, got none")
    columns: dict[str, list[float]] = {key: [] for key in _RECORD_FIELDS}
    format_errors = 0
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(f"record {i} must be a mapping, got {type(record).__name__}")
        for key in _RECORD_FIELDS:
            columns[key].append(_record_number(record, key, i))
        if "format_ok" not in record:
            raise ValueError(f"record {i} has no 'format_ok'")
        if not isinstance(record["format_ok"], (bool, np.bool_)):
            raise ValueError(f"record {i}: format_ok={record['format_ok']!r} must be a bool")
        format_errors += not record["format_ok"]
    n = len(records)
    return {
        "em": float(np.mean(columns["em"])),
        "f1": float(np.mean(columns["f1"])),
        "raw_cost": float(np.mean(columns["raw_cost"])),
        "full_cost": float(np.mean(columns["full_cost"])),
        "calls_per_question": float(np.mean(columns["calls"])),
        "format_error_rate": format_errors / n,
        "n": n,
    }


def summarize_by(records: Sequence[Mapping[str, Any]], key: str = "dataset") -> dict[str, dict[str, float]]:
    """`summarize` per value of `records[i][key]` (sorted by that value), plus an "overall" entry over all.

    Every record must carry `key`; a group named "overall" would clash with the total and is refused.
    """
    if len(records) == 0:
        raise ValueError("summarize_by needs at least one record, got none")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for i, record in enumerate(records):
        if key not in record:
            raise ValueError(f"record {i} has no {key!r} to group by")
        name = str(record[key])
        if name == "overall":
            raise ValueError(f"record {i}: {key}='overall' clashes with the overall entry; rename the group")
        groups.setdefault(name, []).append(record)
    table = {name: summarize(groups[name]) for name in sorted(groups)}
    table["overall"] = summarize(records)
    return table


# ---------------------------------------------------------------------------
# RouterBench: AIQ over the non-decreasing convex hull of (cost, quality) points
# ---------------------------------------------------------------------------

def _check_points(points: Sequence[tuple[float, float]]) -> np.ndarray:
    array = np.asarray(points, dtype=float)
    if array.size == 0:
        raise ValueError("need at least one (cost, quality) point, got none")
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"points must be (cost, quality) pairs, got an array of shape {array.shape}")
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"point {i} = {tuple(array[i])} is not finite")
    return array


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    # z of (a - o) x (b - o): > 0 means o -> a -> b turns left (counter-clockwise)
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def pareto_hull(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Vertices of the non-decreasing upper convex hull of (cost, quality) points, by increasing cost.

    At equal cost only the best quality counts. The hull is the upper chain of Andrew's monotone
    chain (O(n log n)); collinear middle points are dropped, and the chain is cut at its first
    highest-quality vertex, after which RouterBench's curve stays flat (Hu et al. 2024,
    arXiv 2403.12031). Plots draw a flat line from the last vertex onwards.
    """
    array = _check_points(points)
    order = np.lexsort((-array[:, 1], array[:, 0]))  # by cost, then best quality first
    hull: list[tuple[float, float]] = []
    last_cost = None
    for cost, quality in array[order]:
        if cost == last_cost:
            continue  # a worse point at an already-seen cost
        last_cost = cost
        point = (float(cost), float(quality))
        # pop while the turn is not strictly clockwise: the middle point lies under or on the chord
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) >= 0:
            hull.pop()
        hull.append(point)
    peak = max(range(len(hull)), key=lambda i: (hull[i][1], -i))  # first vertex of highest quality
    return hull[:peak + 1]


def aiq(points: Sequence[tuple[float, float]], c_max: float | None = None, c_min: float | None = None) -> float:
    """Average improvement in quality: the mean height of the non-decreasing hull over [c_min, c_max].

    AIQ = 1/(c_max - c_min) * integral from c_min to c_max of R(c) dc, with R the hull of
    `pareto_hull` extended flat past its last vertex (Hu et al. 2024, arXiv 2403.12031).
    c_min defaults to the smallest cost among the points; c_max to the largest, and may be
    anywhere >= c_min. When c_max equals c_min (one point, or all at one cost) AIQ is R(c_min),
    the best quality at that cost. To compare curves, give them all one range [c_min, c_max] (the
    smallest and largest cost of every curve compared): below its own cheapest point a curve's
    quality counts 0, so no curve gains by covering only the cheap end.
    """
    hull = pareto_hull(points)
    xs = np.array([p[0] for p in hull])
    ys = np.array([p[1] for p in hull])
    if c_min is None:
        c_min = float(xs[0])
    if c_max is None:
        c_max = max(float(np.max(np.asarray(points, dtype=float)[:, 0])), c_min)
    if not (math.isfinite(c_min) and math.isfinite(c_max)) or c_max < c_min:
        raise ValueError(f"need finite c_min <= c_max, got c_min={c_min!r}, c_max={c_max!r}")
    if c_min < xs[0]:  # R is 0 below the cheapest point
        xs, ys = np.concatenate([[c_min, xs[0]], xs]), np.concatenate([[0.0, 0.0], ys])
    elif c_min > xs[0]:  # the range starts inside the hull
        keep = xs > c_min
        height = np.interp(c_min, xs, ys) if keep.any() else ys[-1]
        xs, ys = np.append(c_min, xs[keep]), np.append(height, ys[keep])
    if c_max == c_min:
        return float(ys[-1] if c_min >= xs[-1] else ys[np.searchsorted(xs, c_min, side="right") - 1])
    if c_max >= xs[-1]:
        xs, ys = np.append(xs, c_max), np.append(ys, ys[-1])  # flat past the highest-quality vertex
    else:
        keep = xs < c_max  # c_max cuts a hull segment: stop there
        xs, ys = np.append(xs[keep], c_max), np.append(ys[keep], np.interp(c_max, xs, ys))
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2))  # trapezoids between vertices
    return area / (c_max - c_min)


# ---------------------------------------------------------------------------
# Routing Score and its bounds
# ---------------------------------------------------------------------------

def _finite_array(values: Any, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != ndim or array.size == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds a non-finite value at index {tuple(np.argwhere(~np.isfinite(array))[0])}")
    return array


def _cost_discount(cost: np.ndarray, c_min: float, c_max: float) -> np.ndarray:
    if not (math.isfinite(c_min) and math.isfinite(c_max)) or c_max < c_min:
        raise ValueError(f"need finite c_min <= c_max, got c_min={c_min!r}, c_max={c_max!r}")
    if c_max == c_min:
        return np.ones_like(cost)  # every cost normalises to 0
    return 1.0 - np.clip((cost - c_min) / (c_max - c_min), 0.0, 1.0)


def routing_score(quality: Any, cost: Any, c_min: float, c_max: float) -> float:
    """RS = mean over queries of quality * (1 - normalised cost), cost min-max scaled into [0, 1].

    `quality` and `cost` are (Q,) arrays of the routed outcome per query. Costs outside
    [c_min, c_max] are clipped; c_max == c_min makes every normalised cost 0.
    """
    quality = _finite_array(quality, "quality", 1)
    cost = _finite_array(cost, "cost", 1)
    if quality.shape != cost.shape:
        raise ValueError(f"quality shape {quality.shape} and cost shape {cost.shape} differ")
    return float(np.mean(quality * _cost_discount(cost, c_min, c_max)))


def routing_score_bounds(quality_matrix: Any, cost_matrix: Any) -> dict[str, float]:
    """Routing Score of the per-query oracle and of the quality-only choice, from (Q, M) outcomes.

    Entry [q, m] is candidate m's quality or cost on query q; c_min and c_max are the matrix's
    smallest and largest cost. `oracle` picks, per query, the candidate with the largest
    quality * (1 - normalised cost), an upper bound for any router over these candidates.
    `quality_only` always picks the candidate of highest mean quality (the first on ties).
    """
    quality = _finite_array(quality_matrix, "quality_matrix", 2)
    cost = _finite_array(cost_matrix, "cost_matrix", 2)
    if quality.shape != cost.shape:
        raise ValueError(f"quality_matrix shape {quality.shape} and cost_matrix shape {cost.shape} differ")
    c_min, c_max = float(cost.min()), float(cost.max())
    oracle = float(np.mean(np.max(quality * _cost_discount(cost, c_min, c_max), axis=1)))
    best = int(np.argmax(quality.mean(axis=0)))
    return {"oracle": oracle, "quality_only": routing_score(quality[:, best], cost[:, best], c_min, c_max)}


# ---------------------------------------------------------------------------
# RouteLLM: strong/weak routing, performance gap recovered
# ---------------------------------------------------------------------------

def pgr(quality: float | np.ndarray, weak: float, strong: float) -> float | np.ndarray:
    """Performance gap recovered: (quality - weak) / (strong - weak) (Ong et al. 2024, arXiv 2406.18665)."""
    if not (math.isfinite(weak) and math.isfinite(strong)):
        raise ValueError(f"weak={weak!r} and strong={strong!r} must be finite")
    if strong == weak:
        raise ValueError(f"strong and weak quality are both {strong!r}: the gap is empty, PGR is undefined")
    quality = np.asarray(quality, dtype=float)
    if not np.isfinite(quality).all():
        raise ValueError(f"quality must be finite, got {quality!r}")
    result = (quality - weak) / (strong - weak)
    return float(result) if result.ndim == 0 else result


def _pgr_curve(call_pcts: Any, qualities: Any, weak_quality: float, strong_quality: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """The sweep as (call %, PGR) sorted by call %, qualities at a repeated call % averaged,
    with (0, weak) and (100, strong) added where the sweep has no point at 0 or 100."""
    pcts = _finite_array(call_pcts, "call_pcts", 1)
    quals = _finite_array(qualities, "qualities", 1)
    if pcts.shape != quals.shape:
        raise ValueError(f"call_pcts shape {pcts.shape} and qualities shape {quals.shape} differ")
    if pcts.min() < 0 or pcts.max() > 100:
        raise ValueError(f"call_pcts must be percentages in [0, 100], got range [{pcts.min()}, {pcts.max()}]")
    unique, inverse = np.unique(pcts, return_inverse=True)
    means = np.bincount(inverse, weights=quals) / np.bincount(inverse)
    if unique[0] > 0:
        unique, means = np.insert(unique, 0, 0.0), np.insert(means, 0, weak_quality)
    if unique[-1] < 100:
        unique, means = np.append(unique, 100.0), np.append(means, strong_quality)
    return unique, pgr(means, weak_quality, strong_quality)


def apgr(call_pcts: Any, qualities: Any, weak_quality: float, strong_quality: float) -> float:
    """Average PGR: trapezoid area under PGR vs strong-call % over [0, 100], divided by 100.

    `call_pcts` are percentages of queries sent to the strong model (not fractions), one per
    threshold of the sweep, `qualities` the quality reached there. Points are sorted by call %,
    repeated call % averaged, and (0, weak) and (100, strong) added if missing
    (Ong et al. 2024, arXiv 2406.18665). A random router scores 0.5.
    """
    xs, ys = _pgr_curve(call_pcts, qualities, weak_quality, strong_quality)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2)) / 100.0


def cpt(call_pcts: Any, qualities: Any, weak_quality: float, strong_quality: float,
        target_pgr: float = 0.5) -> float:
    """Call-performance threshold: the smallest strong-call % at which PGR reaches `target_pgr`.

    The curve is the one `apgr` integrates, read as straight lines between sweep points
    (Ong et al. 2024, arXiv 2406.18665; CPT(50%) is target 0.5). A target the curve
    never reaches raises ValueError rather than returning a sentinel such as 100.
    """
    if not math.isfinite(target_pgr):
        raise ValueError(f"target_pgr={target_pgr!r} must be finite")
    xs, ys = _pgr_curve(call_pcts, qualities, weak_quality, strong_quality)
    reached = np.nonzero(ys >= target_pgr)[0]
    if reached.size == 0:
        raise ValueError(f"PGR never reaches target_pgr={target_pgr}; the curve's best is {ys.max():.4f}")
    i = int(reached[0])
    if i == 0:
        return float(xs[0])
    # ys[i-1] < target <= ys[i]: interpolate linearly inside that segment
    return float(xs[i - 1] + (target_pgr - ys[i - 1]) / (ys[i] - ys[i - 1]) * (xs[i] - xs[i - 1]))


# ---------------------------------------------------------------------------
# Bootstrap confidence intervals
# ---------------------------------------------------------------------------

def bootstrap_ci(values: Any, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                 statistic: Callable[[np.ndarray], float] = np.mean) -> tuple[float, float, float]:
    """(point, low, high): `statistic` of the values and its percentile bootstrap interval.

    Draws `n_resamples` samples with replacement of the same size from a generator of its own,
    `np.random.default_rng(seed)`, so the interval depends only on the inputs and the seed; low
    and high are the (1 - confidence)/2 and (1 + confidence)/2 quantiles of the resampled statistic.
    """
    data = _finite_array(values, "values", 1)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples!r} must be an integer >= 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must lie strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, data.size, size=(n_resamples, data.size))
    stats = np.array([statistic(data[row]) for row in indices], dtype=float)
    low, high = np.quantile(stats, [(1.0 - confidence) / 2, (1.0 + confidence) / 2])
    return float(statistic(data)), float(low), float(high)
