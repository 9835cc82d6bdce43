"""The oracle plan: the routing plan with the highest expected Router-R1 reward, computed from the
candidates' known skills and reply lengths (a ceiling for learned routers, not a router itself)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from envs.candidates.spec import CandidateSpec
from envs.routeworld.candidates import (expected_reply_tokens, profile_by_name, reply_text, reply_tokens,
                                        success_probability)
from envs.routeworld.config import CandidateProfile
from envs.routeworld.world import World
from rewards.cost import CostNormalizer, make_cost_normalizer

# Micro-dollars: about two verbose Generalist-XL replies (~75 each), the most a sensible plan spends.
DEFAULT_COST_BUDGET = 150.0


@dataclass(frozen=True)
class OraclePlan:
    """A plan's calls in order, as (candidate, sub-question); a two-hop question has either one call
    (asked whole) or two (hop 2 names hop 1's right answer). Expectations are over the candidates'
    randomness; cost is in micro-dollars (completion tokens only, the pool's default)."""

    expected_em: float
    expected_cost: float
    expected_reward: float
    calls: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class OracleSummary:
    """Means of the oracle plans' expectations over `n` questions."""

    n: int
    em: float
    cost: float
    reward: float


def _profiles(world: World, candidates: Sequence[str | CandidateSpec] | None) -> list[CandidateProfile]:
    if candidates is None:
        return list(world.config.candidates)
    return [profile_by_name(world, c.name if isinstance(c, CandidateSpec) else c) for c in candidates]


def _step(world: World, profile: CandidateProfile, text: str):
    """(P(right), cost if right, expected cost, P(reply says unknown)) of asking `text`."""
    query = world.lookup(text)
    if query is None:
        raise ValueError(f"{text!r} is not a question of this world")
    p = success_probability(profile, query)
    price = profile.price_per_1m_output
    right_cost = reply_tokens(reply_text(profile, query.answer)) * price
    p_unknown = (1 - p) * profile.unknown_rate
    return p, right_cost, expected_reply_tokens(world, profile, query) * price, p_unknown


def oracle_plan(
    world: World,
    question: Mapping,
    candidates: Sequence[str | CandidateSpec] | None = None,
    alpha: float = 0.0,
    cost_normalizer: CostNormalizer | None = None,
    max_turns: int = 4,
) -> OraclePlan:
    """The plan maximising E[reward] = E[(1 - alpha) * EM + alpha * cost_score] (0 when EM is 0).

    Plans: one call per hop to any candidate, or (two-hop questions) the whole question to one
    candidate; at most `max_turns` calls. A plan is right only when every call is (a wrong hop 1 makes
    the answer wrong), so E[reward] = P(right) * ((1 - alpha) + alpha * score(cost when right)):
    right replies have a fixed length. `expected_cost` assumes the agent stops after an "unknown"
    reply and counts hop 2 at the length of a reply to the true hop-2 question. Ties go to the lower
    expected cost, then the fewer calls, then the earlier candidate.

    `cost_normalizer` defaults to the "budget" normalizer at `DEFAULT_COST_BUDGET`: a fixed scale
    gives every plan a fixed score. The paper's "router_r1" normalizer scores a cost against a window
    of recent costs, which moves with the policy's own spending, so no plan is best once and for all.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    normalizer = cost_normalizer or make_cost_normalizer("budget", budget=DEFAULT_COST_BUDGET)
    profiles = _profiles(world, candidates)
    hops = question["hops"]

    def value(p_right: float, right_cost: float) -> float:
        return p_right * ((1 - alpha) + alpha * normalizer.score(right_cost))

    options: list[tuple[float, float, int, int, OraclePlan]] = []

    def consider(calls: list[tuple[str, str]], p: float, right_cost: float, cost: float) -> None:
        plan = OraclePlan(p, cost, value(p, right_cost), calls)
        options.append((-plan.expected_reward, cost, len(calls), len(options), plan))

    if len(hops) > 1:
        for prof in profiles:  # the whole question to one candidate
            p, right_cost, cost, _ = _step(world, prof, question["question"])
            consider([(prof.name, question["question"])], p, right_cost, cost)
    if len(hops) <= max_turns:
        _hop_plans(world, profiles, hops, consider)
    options.sort(key=lambda o: (round(o[0], 12), round(o[1], 9), o[2], o[3]))
    return options[0][4]


def _hop_plans(world: World, profiles: list[CandidateProfile], hops: list[Mapping], consider) -> None:
    """Offer `consider` every assignment of one candidate per hop."""
    def extend(i: int, calls: list, p: float, right_cost: float, cost: float, p_reach: float) -> None:
        if i == len(hops):
            consider(calls, p, right_cost, cost)
            return
        for prof in profiles:
            q, rc, ec, p_unknown = _step(world, prof, hops[i]["sub_question"])
            extend(i + 1, calls + [(prof.name, hops[i]["sub_question"])], p * q, right_cost + rc,
                   cost + p_reach * ec, p_reach * (1 - p_unknown))
    extend(0, [], 1.0, 0.0, 0.0, 1.0)


def oracle_summary(
    world: World,
    split: str,
    alpha: float,
    candidates: Sequence[str | CandidateSpec] | None = None,
    cost_normalizer: CostNormalizer | None = None,
    max_turns: int = 4,
) -> OracleSummary:
    """Mean expected EM, cost (micro-dollars) and reward of the oracle plans over a split."""
    plans = [oracle_plan(world, q, candidates, alpha, cost_normalizer, max_turns)
             for q in world.questions(split)]
    n = len(plans)
    return OracleSummary(n, sum(p.expected_em for p in plans) / n, sum(p.expected_cost for p in plans) / n,
                         sum(p.expected_reward for p in plans) / n)


def plan_disagreement(
    world: World,
    split: str,
    alpha_a: float,
    alpha_b: float,
    candidates: Sequence[str | CandidateSpec] | None = None,
    cost_normalizer: CostNormalizer | None = None,
) -> float:
    """The share of a split's questions whose oracle plans (call lists) differ between two alphas."""
    questions = world.questions(split)
    differ = sum(oracle_plan(world, q, candidates, alpha_a, cost_normalizer).calls
                 != oracle_plan(world, q, candidates, alpha_b, cost_normalizer).calls for q in questions)
    return differ / len(questions)
