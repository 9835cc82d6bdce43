"""Tests of rewards/compose.py: the Router-R1 reward built from format, outcome and cost score."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rewards import RewardBreakdown, compute_reward, make_cost_normalizer
from rewards.cost import BudgetNormalizer

NAMES = ("Qwen2.5-7B-Instruct", "Mistral-7B")
RIGHT = ("<think> who? </think><search> Mistral-7B: author of Hamlet </search><info> Shakespeare </info>"
         "<think> sure </think><answer> William Shakespeare </answer>")
PARTIAL = "<think> t </think><answer> Shakespeare </answer>"  # EM 0, F1 2/3 against "William Shakespeare"
WRONG = "<think> t </think><answer> Marlowe </answer>"
MALFORMED = "<answer> William Shakespeare </answer>"  # right answer, but no <think>
GOLD = ["William Shakespeare"]


class SpyBudget(BudgetNormalizer):
    """A real budget normalizer that counts how often compute_reward touches it."""

    def __init__(self, budget: float = 100.0):
        super().__init__(budget)
        self.score_calls = self.update_calls = 0

    def score(self, raw: float) -> float:
        self.score_calls += 1
        return super().score(raw)

    def update(self, raw_costs) -> None:
        self.update_calls += 1
        super().update(raw_costs)


def reward(response=RIGHT, alpha=0.5, raw=25.0, **kw) -> RewardBreakdown:
    return compute_reward(response, GOLD, NAMES, raw, alpha, **kw)


# --- the three branches ---------------------------------------------------------------------------

def test_malformed_total_is_minus_one_even_when_the_answer_is_right():
    assert reward(MALFORMED, cost_normalizer=SpyBudget()) == RewardBreakdown(-1.0, -1.0, 0.0, 0.0)


def test_wrong_answer_total_is_zero_whatever_the_cost():
    # a cheap wrong answer must not beat an expensive right one: no cost term without outcome
    out = reward(WRONG, raw=0.0, cost_normalizer=SpyBudget())
    assert out == RewardBreakdown(0.0, 0.0, 0.0, 0.0)


def test_right_answer_total_mixes_outcome_and_cost_score_by_alpha():
    # budget 100, cost 25 -> cost score 0.75; (1 - 0.3) * 1 + 0.3 * 0.75 = 0.925
    out = reward(alpha=0.3, raw=25.0, cost_normalizer=SpyBudget(100.0))
    assert out.total == pytest.approx(0.925)
    assert (out.format, out.outcome, out.cost) == (0.0, 1.0, 0.75)


def test_f1_metric_gives_partial_credit_where_em_gives_none():
    em = reward(PARTIAL, alpha=0.0, metric="em")
    f1 = reward(PARTIAL, alpha=0.0, metric="f1")
    assert (em.total, f1.total) == (0.0, pytest.approx(2 / 3))


def test_f1_partial_outcome_uses_the_cost_term():
    # outcome > 0 (not == 1) is what switches the cost term on
    out = reward(PARTIAL, alpha=0.5, raw=0.0, metric="f1", cost_normalizer=SpyBudget(100.0))
    assert out.total == pytest.approx(0.5 * 2 / 3 + 0.5 * 1.0)


def test_unknown_metric_is_value_error():
    with pytest.raises(ValueError, match="metric"):
        reward(metric="bleu")


def test_no_normalizer_means_cost_score_zero():
    out = reward(alpha=0.4)
    assert (out.total, out.cost) == (pytest.approx(0.6), 0.0)


def test_outcome_scores_the_normalized_answer_content():
    # newlines, spacing, case and punctuation inside the answer block do not cost the match
    assert reward("<think>t</think><answer>\n william  shakespeare.\n</answer>", alpha=0.0).outcome == 1.0


# --- alpha ----------------------------------------------------------------------------------------

def test_alpha_zero_is_outcome_only():
    assert reward(alpha=0.0, raw=1e9, cost_normalizer=SpyBudget()).total == 1.0


def test_alpha_one_is_cost_score_only_for_a_right_answer():
    out = reward(alpha=1.0, raw=40.0, cost_normalizer=SpyBudget(100.0))
    assert out.total == pytest.approx(0.6)


def test_alpha_one_still_gives_zero_for_a_wrong_answer():
    # even when only cost counts, a wrong answer earns nothing
    assert reward(WRONG, alpha=1.0, raw=0.0, cost_normalizer=SpyBudget()).total == 0.0


@pytest.mark.parametrize("alpha", [-0.01, 1.01, float("nan"), float("inf"), None, "0.5", True])
def test_alpha_outside_unit_interval_is_value_error_naming_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        reward(alpha=alpha)


@pytest.mark.parametrize("alpha", [0, 1])
def test_integer_alpha_boundaries_are_accepted(alpha):
    assert reward(alpha=alpha, raw=0.0, cost_normalizer=SpyBudget()).total == 1.0


@given(st.floats(0, 1), st.floats(0, 1e4))
def test_right_answer_total_lies_between_cost_score_and_outcome(alpha, raw):
    # outcome is 1 here, so the total is a convex mix of the cost score and 1
    out = reward(alpha=alpha, raw=raw, cost_normalizer=SpyBudget(1e3))
    assert out.cost - 1e-12 <= out.total <= 1.0 + 1e-12


# --- the normalizer is read, never fed ------------------------------------------------------------

def test_compute_reward_never_calls_update():
    # the trainer updates once per batch; an update per sample would double-count every cost
    spy = SpyBudget()
    for response in (RIGHT, WRONG, MALFORMED, PARTIAL):
        for metric in ("em", "f1"):
            reward(response, alpha=0.5, metric=metric, cost_normalizer=spy)
    assert spy.update_calls == 0


def test_score_is_called_once_when_the_cost_term_is_used():
    spy = SpyBudget()
    reward(alpha=0.5, cost_normalizer=spy)
    assert spy.score_calls == 1


@pytest.mark.parametrize("response,alpha", [(MALFORMED, 0.5), (WRONG, 0.5), (RIGHT, 0.0)])
def test_score_is_not_called_when_the_cost_term_is_unused(response, alpha):
    # malformed, wrong, or alpha 0: the cost score cannot matter, so it is not read
    spy = SpyBudget()
    reward(response, alpha=alpha, cost_normalizer=spy)
    assert spy.score_calls == 0


def test_router_r1_normalizer_state_is_unchanged_by_compute_reward():
    norm = make_cost_normalizer("router_r1")
    norm.update([1.0, 4.0, 9.0, 16.0])
    before = norm.state_dict()
    reward(alpha=0.5, raw=4.0, cost_normalizer=norm)
    assert norm.state_dict() == before


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [-1.0, float("nan"), float("inf"), None, "5", True])
def test_invalid_raw_cost_is_value_error(raw):
    with pytest.raises(ValueError, match="raw_cost"):
        reward(raw=raw)


@pytest.mark.parametrize("response", [RIGHT, MALFORMED])
def test_empty_golden_list_is_value_error_even_when_malformed(response):
    # a data error must not hide behind the format penalty and come out as an ordinary -1
    with pytest.raises(ValueError, match="empty"):
        compute_reward(response, [], NAMES, 0.0, 0.5)


@pytest.mark.parametrize("golden", [None, 3, [None], ["ok", 1]])
def test_non_string_golden_answers_are_type_error(golden):
    with pytest.raises(TypeError):
        compute_reward(RIGHT, golden, NAMES, 0.0, 0.5)


def test_non_string_response_is_type_error():
    with pytest.raises(TypeError):
        compute_reward(None, GOLD, NAMES, 0.0, 0.5)


def test_single_string_golden_answer_is_accepted():
    assert compute_reward(RIGHT, "william shakespeare", NAMES, 0.0, 0.0).total == 1.0


def test_unicode_answer_is_scored():
    text = "<think> 首都 </think><answer> 北京 🎉 </answer>"
    assert compute_reward(text, ["北京 🎉"], NAMES, 0.0, 0.0).total == 1.0
