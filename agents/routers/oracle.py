"""The oracle: per question, the cheapest candidate whose whole-question reply is right (the only
router that reads golden answers); the cheapest candidate when none is."""

from __future__ import annotations

import numpy as np

from agents.routers.base import SingleCallRouter, register_router
from agents.routers.outcomes import OutcomeData, from_calls


def oracle_choice(outcomes: OutcomeData) -> np.ndarray:
    """(Q,) per question the lowest-cost candidate with quality 1 (exact match), ties to the first
    listed; where no candidate is right, the candidate of lowest mean cost."""
    right = outcomes.quality >= 1.0
    cost = np.where(right, outcomes.cost, np.inf)
    cheapest_overall = int(np.argmin(outcomes.cost.mean(axis=0)))
    return np.where(right.any(axis=1), np.argmin(cost, axis=1), cheapest_overall)


@register_router("oracle")
class OracleRouter(SingleCallRouter):
    """Calls every candidate on every question outside the episode (the calls are deterministic:
    replayed, simulated or cached), scores the answers against the golden ones, then routes each
    question once to `oracle_choice`. Only the routed call is charged."""

    needs_golden = True

    def turn_fn(self, questions, setting, golden=None):
        if golden is None:
            raise ValueError("the oracle needs the golden answers of the questions it routes")
        self._outcomes = from_calls(self.ctx.pool, questions, golden,
                                    lambda q, reply: self.ctx.answerer.answer(-1, q, reply))
        self.ctx.answerer.tokens.pop(-1, None)  # reading replies offline is not part of the episode
        return super().turn_fn(questions, setting, golden)

    def choose(self, questions, setting, rng):
        return oracle_choice(self._outcomes)
