"""Tests of rewards/cost.py: raw call cost and the cost normalizers ("router_r1", "budget", "none")."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from envs.candidates.spec import CallRecord
from rewards import make_cost_normalizer, raw_cost


def call(prompt=0, completion=0, price_in=0.0, price_out=0.0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "price_per_1m_input": price_in, "price_per_1m_output": price_out}


# --- raw_cost -------------------------------------------------------------------------------------

def test_raw_cost_of_no_calls_is_zero():
    assert raw_cost([]) == 0.0


def test_raw_cost_is_tokens_times_price_without_dividing_by_a_million():
    # micro-dollars: 100 completion tokens at $0.6 per 1M tokens -> 60, not 6e-5
    assert raw_cost([call(completion=100, price_out=0.6)]) == pytest.approx(60.0)


def test_raw_cost_charges_prompt_tokens_at_input_price():
    assert raw_cost([call(prompt=1000, completion=10, price_in=0.1, price_out=2.0)]) == pytest.approx(120.0)


def test_raw_cost_sums_over_calls():
    calls = [call(completion=10, price_out=1.0), call(prompt=5, price_in=2.0), call(completion=1, price_out=0.5)]
    assert raw_cost(calls) == pytest.approx(20.5)


def test_raw_cost_accepts_objects_with_attributes():
    obj = SimpleNamespace(prompt_tokens=2, completion_tokens=3, price_per_1m_input=1.0, price_per_1m_output=4.0)
    assert raw_cost([obj]) == pytest.approx(14.0)


def test_raw_cost_accepts_ledger_call_records():
    # the env's ledger entries feed raw_cost directly
    rec = CallRecord("Mistral-7B", "q", "r", prompt_tokens=7, completion_tokens=9,
                     price_per_1m_input=0.0, price_per_1m_output=0.2)
    assert raw_cost([rec]) == pytest.approx(1.8)


def test_raw_cost_accepts_a_generator():
    assert raw_cost(call(completion=1, price_out=1.0) for _ in range(3)) == pytest.approx(3.0)


@pytest.mark.parametrize("missing", ["prompt_tokens", "completion_tokens", "price_per_1m_input",
                                     "price_per_1m_output"])
def test_raw_cost_missing_field_is_value_error_naming_it(missing):
    # a ledger row without a price must fail, not count as free
    row = call(1, 1, 1.0, 1.0)
    del row[missing]
    with pytest.raises(ValueError, match=missing):
        raw_cost([row])


def test_raw_cost_missing_attribute_is_value_error_naming_it():
    obj = SimpleNamespace(prompt_tokens=2, completion_tokens=3, price_per_1m_input=1.0)
    with pytest.raises(ValueError, match="price_per_1m_output"):
        raw_cost([obj])


def test_raw_cost_none_field_counts_as_missing():
    # a backend that could not count tokens reports None; pricing that as 0 would hide it
    with pytest.raises(ValueError, match="completion_tokens"):
        raw_cost([call() | {"completion_tokens": None}])


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "10", True])
def test_raw_cost_invalid_field_value_is_value_error(value):
    with pytest.raises(ValueError, match="prompt_tokens"):
        raw_cost([call() | {"prompt_tokens": value}])


@given(st.lists(st.tuples(*[st.integers(0, 10_000)] * 2, *[st.floats(0, 100)] * 2), max_size=8))
def test_raw_cost_is_nonnegative_and_additive_over_call_lists(rows):
    calls = [call(*r) for r in rows]
    half = len(calls) // 2
    total = raw_cost(calls)
    assert total >= 0
    assert total == pytest.approx(raw_cost(calls[:half]) + raw_cost(calls[half:]))


# --- make_cost_normalizer -------------------------------------------------------------------------

def test_unknown_normalizer_name_lists_known_ones():
    with pytest.raises(ValueError) as err:
        make_cost_normalizer("percentile")
    for known in ("router_r1", "budget", "none"):
        assert known in str(err.value)


def test_router_r1_default_window_is_1000():
    assert make_cost_normalizer("router_r1").window == 1000


@pytest.mark.parametrize("window", [0, -5, 2.5])
def test_router_r1_bad_window_is_value_error(window):
    with pytest.raises(ValueError, match="window"):
        make_cost_normalizer("router_r1", window=window)


# --- router_r1 ------------------------------------------------------------------------------------

def expected_router_r1(window_raws, raw) -> float:
    """The rule written out independently: percentiles of sqrt values, scaled, clipped, flipped."""
    roots = np.sqrt(np.asarray(window_raws, float))
    lo, hi = np.percentile(roots, 5), np.percentile(roots, 95)
    if hi - lo < 1e-8:
        return 0.5
    return 1.0 - min(max((math.sqrt(raw) - lo) / (hi - lo), 0.0), 1.0)


def test_router_r1_empty_window_scores_half():
    assert make_cost_normalizer("router_r1").score(123.0) == 0.5


def test_router_r1_degenerate_window_scores_half():
    # all costs equal -> hi == lo; dividing by zero there would give nan or inf
    norm = make_cost_normalizer("router_r1")
    norm.update([4.0] * 10)
    assert norm.score(0.0) == 0.5 and norm.score(100.0) == 0.5


def test_router_r1_score_matches_percentile_rule_on_sqrt_costs():
    costs = [0, 1, 4, 9, 16, 25, 36, 49, 64, 81, 100]
    norm = make_cost_normalizer("router_r1")
    norm.update(costs)
    for raw in (0.0, 2.0, 20.0, 50.0, 100.0):
        assert norm.score(raw) == pytest.approx(expected_router_r1(costs, raw))


def test_router_r1_uses_sqrt_not_raw_cost():
    # with roots 0..10 the midpoint 5 is raw cost 25; on raw costs 25 would score far above 0.5
    norm = make_cost_normalizer("router_r1")
    norm.update([float(i * i) for i in range(11)])
    assert norm.score(25.0) == pytest.approx(0.5)


def test_router_r1_clips_to_one_below_and_zero_above_the_window():
    norm = make_cost_normalizer("router_r1")
    norm.update([float(i) for i in range(1, 101)])
    assert norm.score(0.0) == 1.0
    assert norm.score(1e9) == 0.0


def test_router_r1_cheaper_scores_at_least_as_high():
    norm = make_cost_normalizer("router_r1")
    norm.update([3.0, 50.0, 7.0, 900.0, 12.0])
    scores = [norm.score(c) for c in (0.0, 5.0, 10.0, 40.0, 400.0, 1e6)]
    assert scores == sorted(scores, reverse=True)


def test_router_r1_score_is_pure():
    norm = make_cost_normalizer("router_r1", window=3)
    norm.update([1.0, 4.0, 9.0])
    before = norm.state_dict()
    for _ in range(10):  # scoring a huge cost repeatedly would push small costs out if score updated
        norm.score(1e6)
    assert norm.state_dict() == before


def test_router_r1_call_is_update_then_score():
    called, stepwise = make_cost_normalizer("router_r1"), make_cost_normalizer("router_r1")
    for raw in (5.0, 1.0, 30.0, 2.0):
        stepwise.update([raw])
        assert called(raw) == stepwise.score(raw)
    assert called.state_dict() == stepwise.state_dict()


def test_router_r1_first_call_sees_its_own_cost():
    # update happens before score: one value in the window -> degenerate -> 0.5
    assert make_cost_normalizer("router_r1")(7.0) == 0.5


def test_router_r1_window_slides_dropping_the_oldest():
    norm = make_cost_normalizer("router_r1", window=3)
    norm.update([1e6, 1.0, 4.0, 9.0])  # 1e6 is pushed out by the fourth value
    fresh = make_cost_normalizer("router_r1", window=3)
    fresh.update([1.0, 4.0, 9.0])
    assert norm.state_dict() == fresh.state_dict()
    assert norm.score(4.0) == fresh.score(4.0) == expected_router_r1([1, 4, 9], 4.0)


def test_router_r1_normalizers_do_not_share_a_window():
    # Router-R1 kept the window in a module global, so train and eval normalizers polluted each other
    a, b = make_cost_normalizer("router_r1"), make_cost_normalizer("router_r1")
    a.update([1.0, 100.0, 10_000.0])
    assert b.score(100.0) == 0.5


def test_router_r1_state_dict_round_trip_gives_identical_scores():
    src = make_cost_normalizer("router_r1", window=5)
    src.update([2.0, 8.0, 1.0, 30.0, 7.0, 0.5, 60.0])
    dst = make_cost_normalizer("router_r1")  # default window; the state brings its own
    dst.load_state_dict(src.state_dict())
    probes = (0.0, 1.0, 5.0, 20.0, 100.0)
    assert [dst.score(p) for p in probes] == [src.score(p) for p in probes]


def test_router_r1_round_trip_keeps_sliding_the_same_way():
    # the restored window must keep its length limit, or it grows after a resume
    src = make_cost_normalizer("router_r1", window=3)
    src.update([1.0, 2.0, 3.0])
    dst = make_cost_normalizer("router_r1")
    dst.load_state_dict(src.state_dict())
    for n in (src, dst):
        n.update([50.0, 60.0])
    assert dst.state_dict() == src.state_dict()


def test_state_of_another_kind_is_rejected():
    norm = make_cost_normalizer("router_r1")
    with pytest.raises(ValueError, match="budget"):
        norm.load_state_dict(make_cost_normalizer("budget", budget=1.0).state_dict())


@pytest.mark.parametrize("raw", [-1.0, float("nan"), float("inf"), "3", None])
def test_router_r1_invalid_cost_is_value_error(raw):
    norm = make_cost_normalizer("router_r1")
    with pytest.raises(ValueError):
        norm.score(raw)
    with pytest.raises(ValueError):
        norm.update([raw])


@given(st.lists(st.floats(0, 1e6), max_size=40), st.floats(0, 1e7))
def test_router_r1_score_lies_in_unit_interval(window, raw):
    norm = make_cost_normalizer("router_r1", window=16)
    norm.update(window)
    assert 0.0 <= norm.score(raw) <= 1.0


# --- budget ---------------------------------------------------------------------------------------

def test_budget_score_is_one_minus_fraction_of_budget():
    norm = make_cost_normalizer("budget", budget=200.0)
    assert norm.score(0.0) == 1.0
    assert norm.score(50.0) == pytest.approx(0.75)
    assert norm.score(200.0) == 0.0


def test_budget_score_is_zero_above_budget_not_negative():
    assert make_cost_normalizer("budget", budget=10.0).score(1e9) == 0.0


def test_budget_update_changes_nothing():
    norm = make_cost_normalizer("budget", budget=100.0)
    before = (norm.state_dict(), norm.score(40.0))
    norm.update([1.0, 1e6, 3.0])
    assert norm(40.0) == before[1] and norm.state_dict() == before[0]


@pytest.mark.parametrize("budget", [0, -1.0, True, "100"])
def test_budget_must_be_positive_number(budget):
    with pytest.raises(ValueError, match="budget"):
        make_cost_normalizer("budget", budget=budget)


def test_budget_is_required():
    with pytest.raises(TypeError):
        make_cost_normalizer("budget")


def test_budget_state_dict_round_trip_gives_identical_scores():
    src, dst = make_cost_normalizer("budget", budget=37.0), make_cost_normalizer("budget", budget=1.0)
    dst.load_state_dict(src.state_dict())
    assert [dst.score(c) for c in (0.0, 10.0, 37.0, 99.0)] == [src.score(c) for c in (0.0, 10.0, 37.0, 99.0)]


# --- none -----------------------------------------------------------------------------------------

def test_none_always_scores_zero():
    norm = make_cost_normalizer("none")
    norm.update([1.0, 2.0])
    assert [norm.score(c) for c in (0.0, 5.0, 1e9)] + [norm(3.0)] == [0.0] * 4


def test_none_state_dict_round_trips():
    dst = make_cost_normalizer("none")
    dst.load_state_dict(make_cost_normalizer("none").state_dict())
    assert dst.score(1.0) == 0.0
