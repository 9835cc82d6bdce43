"""Tests for rewards.metrics: summaries, AIQ and its hull, Routing Score, PGR/APGR/CPT, bootstrap."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.metrics import (
    aiq, apgr, bootstrap_ci, cpt, pareto_hull, pgr, routing_score, routing_score_bounds, summarize, summarize_by,
)


# --- summarize --------------------------------------------------------------------------------

def _record(em, f1, raw, full, calls, ok, dataset="nq"):
    return {"em": em, "f1": f1, "raw_cost": raw, "full_cost": full, "calls": calls, "format_ok": ok,
            "dataset": dataset}


RECORDS = [
    _record(1, 1.0, 10.0, 30.0, 1, True, "nq"),
    _record(0, 0.5, 20.0, 50.0, 2, True, "nq"),
    _record(0, 0.0, 0.0, 10.0, 0, False, "hotpotqa"),
    _record(1, 0.9, 30.0, 70.0, 3, True, "hotpotqa"),
]


def test_summarize_means_and_format_error_rate_on_hand_records():
    s = summarize(RECORDS)
    assert s["em"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(2.4 / 4)
    assert s["raw_cost"] == pytest.approx(15.0)
    assert s["full_cost"] == pytest.approx(40.0)
    assert s["calls_per_question"] == pytest.approx(1.5)
    assert s["format_error_rate"] == pytest.approx(0.25)
    assert s["n"] == 4


def test_summarize_by_groups_by_key_and_adds_overall():
    table = summarize_by(RECORDS)
    assert list(table) == ["hotpotqa", "nq", "overall"]
    assert table["nq"]["em"] == pytest.approx(0.5) and table["nq"]["n"] == 2
    assert table["hotpotqa"]["format_error_rate"] == pytest.approx(0.5)
    assert table["hotpotqa"]["raw_cost"] == pytest.approx(15.0)
    assert table["overall"] == summarize(RECORDS)


def test_summarize_rejects_missing_field_empty_input_and_non_bool_format_flag():
    broken = dict(RECORDS[0])
    del broken["f1"]
    with pytest.raises(ValueError, match="record 1 has no 'f1'"):
        summarize([RECORDS[0], broken])
    with pytest.raises(ValueError, match="at least one record"):
        summarize([])
    with pytest.raises(ValueError, match="format_ok"):
        summarize([dict(RECORDS[0], format_ok=1)])
    with pytest.raises(ValueError, match="raw_cost"):
        summarize([dict(RECORDS[0], raw_cost=float("nan"))])


def test_summarize_by_rejects_records_without_the_key_and_a_group_named_overall():
    with pytest.raises(ValueError, match="'split'"):
        summarize_by(RECORDS, key="split")
    with pytest.raises(ValueError, match="overall"):
        summarize_by([dict(RECORDS[0], dataset="overall")])


# --- AIQ and the non-decreasing hull ----------------------------------------------------------

def test_dominated_point_inside_the_hull_is_ignored():
    # the chord from (0, .2) to (2, .8) passes (1, .5), above (1, .3)
    points = [(0.0, 0.2), (1.0, 0.3), (2.0, 0.8)]
    assert pareto_hull(points) == [(0.0, 0.2), (2.0, 0.8)]
    assert aiq(points) == pytest.approx(0.5)
    assert aiq(points) == pytest.approx(aiq([(0.0, 0.2), (2.0, 0.8)]))


def test_ties_in_cost_keep_the_best_quality():
    points = [(0.0, 0.2), (0.0, 0.6), (2.0, 0.8)]
    assert pareto_hull(points) == [(0.0, 0.6), (2.0, 0.8)]
    assert aiq(points) == pytest.approx(0.7)


def test_single_cost_gives_its_best_quality():
    assert aiq([(3.0, 0.4)]) == pytest.approx(0.4)
    assert aiq([(1.0, 0.3), (1.0, 0.5)]) == pytest.approx(0.5)


def test_two_points_give_the_trapezoid_mean():
    # area (3 - 1) * (0.2 + 0.6) / 2 = 0.8 over a range of 2
    assert aiq([(1.0, 0.2), (3.0, 0.6)]) == pytest.approx(0.4)


def test_c_max_beyond_the_last_point_extends_flat():
    # 2 * (0.2 + 0.6) / 2 + 2 * 0.6 = 2.0 over a range of 4
    assert aiq([(0.0, 0.2), (2.0, 0.6)], c_max=4.0) == pytest.approx(0.5)


def test_curve_stays_flat_after_its_highest_quality_point():
    points = [(0.0, 0.2), (1.0, 0.8), (2.0, 0.5)]
    assert pareto_hull(points) == [(0.0, 0.2), (1.0, 0.8)]
    assert aiq(points) == pytest.approx((0.5 + 0.8) / 2)


def test_c_max_inside_the_range_cuts_the_hull_segment():
    # the line q = c / 2 from 0 to 1 has area 0.25
    assert aiq([(0.0, 0.0), (2.0, 1.0)], c_max=1.0) == pytest.approx(0.25)
    assert aiq([(0.0, 0.3), (2.0, 1.0)], c_max=0.0) == pytest.approx(0.3)


def test_a_shared_c_min_counts_quality_0_below_a_curves_cheapest_point():
    # a lone point at cost 2 over the shared range [0, 4]: 0 on [0, 2), then 0.9 flat
    assert aiq([(2.0, 0.9)], c_max=4.0, c_min=0.0) == pytest.approx(0.45)
    # so a single cheap-end point cannot beat a curve that spans the whole range
    curve = [(0.0, 0.5), (4.0, 0.9)]
    assert aiq(curve, c_max=4.0, c_min=0.0) == pytest.approx(0.7)
    assert aiq([(4.0, 0.95)], c_max=4.0, c_min=0.0) < aiq(curve, c_max=4.0, c_min=0.0)
    # a c_min inside the hull starts the integral there; without c_min nothing changes
    assert aiq([(0.0, 0.0), (2.0, 1.0)], c_max=2.0, c_min=1.0) == pytest.approx(0.75)
    assert aiq(curve, c_min=0.0) == aiq(curve)
    with pytest.raises(ValueError, match="c_min <= c_max"):
        aiq(curve, c_max=1.0, c_min=2.0)


def test_collinear_middle_point_is_not_a_vertex_and_does_not_change_aiq():
    points = [(0.0, 0.0), (1.0, 0.5), (2.0, 1.0)]
    assert pareto_hull(points) == [(0.0, 0.0), (2.0, 1.0)]
    assert aiq(points) == pytest.approx(0.5)


def test_concave_set_keeps_every_point_while_convex_set_drops_the_middle():
    concave = [(0.0, 0.0), (1.0, 0.8), (2.0, 1.0)]
    convex = [(0.0, 0.0), (1.0, 0.2), (2.0, 1.0)]
    assert pareto_hull(concave) == concave
    assert aiq(concave) == pytest.approx((0.4 + 0.9) / 2)
    assert pareto_hull(convex) == [(0.0, 0.0), (2.0, 1.0)]
    assert aiq(convex) == pytest.approx(0.5)


def test_aiq_rejects_empty_nan_and_c_max_below_the_cheapest_point():
    with pytest.raises(ValueError, match="at least one"):
        aiq([])
    with pytest.raises(ValueError, match="point 1"):
        aiq([(0.0, 0.1), (1.0, float("nan"))])
    with pytest.raises(ValueError, match="c_max"):
        aiq([(1.0, 0.1), (2.0, 0.5)], c_max=0.5)


def _gift_wrap_hull(points):
    """Brute-force reference, O(n * h): from the cheapest best point, step to the point of steepest
    rising slope (farthest on ties), exact in Fractions; stop when nothing rises any more."""
    best = {}
    for c, q in points:
        best[c] = max(best.get(c, q), q)
    current = min(best), best[min(best)]
    hull = [current]
    while True:
        rising = [(Fraction(q - current[1], c - current[0]), c, q) for c, q in best.items()
                  if c > current[0] and q > current[1]]
        if not rising:
            return hull
        _, c, q = max(rising)
        current = (c, q)
        hull.append(current)


def _aiq_on_a_grid(points, n_grid=20001):
    """Independent AIQ: the upper envelope as the best interpolation between any two points, made
    non-decreasing by a running max, averaged over a fine grid."""
    p = np.asarray(points, dtype=float)
    grid = np.linspace(p[:, 0].min(), p[:, 0].max(), n_grid)
    envelope = np.full(n_grid, -np.inf)
    for ci, qi in p:
        for cj, qj in p:
            if ci == cj:
                values = np.where(grid == ci, max(qi, qj), -np.inf)
            elif ci < cj:
                inside = (grid >= ci) & (grid <= cj)
                values = np.where(inside, qi + (qj - qi) * (grid - ci) / (cj - ci), -np.inf)
            else:
                continue
            envelope = np.maximum(envelope, values)
    envelope = np.maximum.accumulate(envelope)
    return float(np.sum(np.diff(grid) * (envelope[1:] + envelope[:-1]) / 2) / (grid[-1] - grid[0]))


# a small integer grid makes ties and collinear hull points common, and keeps the reference exact
integer_points = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(integer_points)
def test_hull_matches_brute_force_gift_wrapping(points):
    expected = [(float(c), float(q)) for c, q in _gift_wrap_hull(points)]
    assert pareto_hull(points) == expected


def test_aiq_matches_a_fine_grid_integral_on_random_points():
    rng = np.random.default_rng(7)
    for _ in range(20):
        points = [tuple(p) for p in rng.uniform(0, 1, size=(int(rng.integers(2, 15)), 2))]
        assert aiq(points) == pytest.approx(_aiq_on_a_grid(points), abs=2e-3)


@settings(max_examples=100, deadline=None)
@given(integer_points)
def test_aiq_lies_between_the_cheapest_best_quality_and_the_best_quality(points):
    cheapest = min(c for c, _ in points)
    low = max(q for c, q in points if c == cheapest)
    high = max(q for _, q in points)
    assert low - 1e-9 <= aiq(points) <= high + 1e-9


# --- Routing Score ----------------------------------------------------------------------------

def test_routing_score_discounts_quality_by_min_max_scaled_cost():
    # discounts 1, 1, 1 - (3 - 1) / 4 = 0.5
    assert routing_score([1.0, 0.0, 0.5], [1.0, 1.0, 3.0], c_min=1.0, c_max=5.0) == pytest.approx(1.25 / 3)


def test_routing_score_clips_costs_outside_the_range_and_handles_equal_bounds():
    assert routing_score([1.0, 1.0], [0.0, 9.0], c_min=1.0, c_max=5.0) == pytest.approx(0.5)
    assert routing_score([1.0, 0.5], [2.0, 2.0], c_min=2.0, c_max=2.0) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="c_min"):
        routing_score([1.0], [1.0], c_min=3.0, c_max=1.0)
    with pytest.raises(ValueError, match="shape"):
        routing_score([1.0, 0.0], [1.0], c_min=0.0, c_max=1.0)


def test_routing_score_bounds_on_a_3x2_hand_example():
    quality = [[1.0, 1.0], [0.0, 1.0], [0.5, 1.0]]
    cost = [[1.0, 5.0], [1.0, 3.0], [1.0, 3.0]]
    # c in [1, 5]: discounts [[1, 0], [1, .5], [1, .5]]; products [[1, 0], [0, .5], [.5, .5]]
    bounds = routing_score_bounds(quality, cost)
    assert bounds["oracle"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    # candidate 1 has the best mean quality (1.0 vs 0.5) and scores 0, .5, .5
    assert bounds["quality_only"] == pytest.approx(1.0 / 3)
    assert bounds["oracle"] >= bounds["quality_only"]


# --- PGR, APGR, CPT ---------------------------------------------------------------------------

WEAK, STRONG = 0.5, 0.9


def test_pgr_is_the_share_of_the_gap_recovered():
    assert pgr(0.7, WEAK, STRONG) == pytest.approx(0.5)
    assert np.allclose(pgr(np.array([0.5, 0.9]), WEAK, STRONG), [0.0, 1.0])
    with pytest.raises(ValueError, match="gap is empty"):
        pgr(0.7, 0.6, 0.6)


def test_apgr_of_a_linear_curve_is_one_half_with_or_without_endpoints():
    pcts = np.array([0.0, 25.0, 50.0, 75.0, 100.0])
    qualities = WEAK + pcts / 100 * (STRONG - WEAK)
    assert apgr(pcts, qualities, WEAK, STRONG) == pytest.approx(0.5)
    assert apgr(pcts[1:4][::-1], qualities[1:4][::-1], WEAK, STRONG) == pytest.approx(0.5)


def test_apgr_of_a_perfect_router_is_near_one():
    pcts = np.arange(1.0, 101.0)
    # (0, weak) is added: the first percent ramps 0 -> 1, then PGR is 1
    assert apgr(pcts, np.full(pcts.shape, STRONG), WEAK, STRONG) == pytest.approx(0.995)


def test_apgr_averages_qualities_at_a_repeated_call_percentage():
    assert apgr([50.0, 50.0], [0.6, 0.8], WEAK, STRONG) == pytest.approx(apgr([50.0], [0.7], WEAK, STRONG))


def test_apgr_rejects_call_fractions_out_of_range():
    with pytest.raises(ValueError, match="percentages"):
        apgr([-0.1, 0.5], [0.6, 0.7], WEAK, STRONG)
    with pytest.raises(ValueError, match="percentages"):
        apgr([50.0, 120.0], [0.6, 0.7], WEAK, STRONG)


CPT_PCTS = [0.0, 20.0, 40.0, 60.0, 100.0]
CPT_QUALITIES = [0.5, 0.6, 0.8, 0.85, 0.9]  # PGR 0, .25, .75, .875, 1


def test_cpt_interpolates_between_sweep_points():
    assert cpt(CPT_PCTS, CPT_QUALITIES, WEAK, STRONG, target_pgr=0.5) == pytest.approx(30.0)
    assert cpt(CPT_PCTS, CPT_QUALITIES, WEAK, STRONG, target_pgr=0.8) == pytest.approx(48.0)


def test_cpt_on_a_sweep_point_and_at_zero_target():
    assert cpt(CPT_PCTS, CPT_QUALITIES, WEAK, STRONG, target_pgr=0.75) == pytest.approx(40.0)
    assert cpt(CPT_PCTS, CPT_QUALITIES, WEAK, STRONG, target_pgr=0.0) == pytest.approx(0.0)


def test_cpt_raises_when_the_target_is_never_reached():
    with pytest.raises(ValueError, match="never reaches"):
        cpt([0.0, 100.0], [0.5, 0.8], WEAK, STRONG, target_pgr=0.8)
    with pytest.raises(ValueError, match="gap is empty"):
        cpt(CPT_PCTS, CPT_QUALITIES, 0.7, 0.7)


# --- bootstrap --------------------------------------------------------------------------------

def test_bootstrap_interval_contains_the_mean():
    values = np.random.default_rng(1).normal(2.0, 1.0, size=200)
    point, low, high = bootstrap_ci(values)
    assert point == pytest.approx(values.mean())
    assert low < point < high


def test_bootstrap_interval_narrows_with_more_data():
    rng = np.random.default_rng(2)
    _, low_small, high_small = bootstrap_ci(rng.normal(size=50))
    _, low_large, high_large = bootstrap_ci(rng.normal(size=5000))
    assert high_large - low_large < (high_small - low_small) / 3


def test_bootstrap_is_deterministic_per_seed_and_leaves_global_state_alone():
    values = np.random.default_rng(3).uniform(size=100)
    state = np.random.get_state()[1].copy()
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5)
    assert bootstrap_ci(values, seed=5) != bootstrap_ci(values, seed=6)
    assert np.array_equal(np.random.get_state()[1], state)


def test_bootstrap_accepts_another_statistic_and_rejects_bad_arguments():
    values = np.array([1.0, 2.0, 3.0, 100.0])
    point, low, high = bootstrap_ci(values, statistic=np.median)
    assert point == pytest.approx(2.5) and low <= point <= high
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(values, confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci(values, n_resamples=0)
    with pytest.raises(ValueError, match="values"):
        bootstrap_ci([])
