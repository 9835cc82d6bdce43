"""FrugalGPT-style cascade: ask candidates cheapest first and stop at the first reply the correctness
scorer trusts (P(right) >= threshold); the last candidate's reply is final. Thresholds are swept."""

from __future__ import annotations

import dataclasses

import numpy as np

from agents.routers.base import RouterSetting, ScriptedRouter, register_router
from agents.routers.scorer import CorrectnessScorer
from envs.chunks import answer_chunk, call_chunk


def cascade_chain(names: list[str], costs: np.ndarray, params: list[float], wanted: list[str]) -> list[int]:
    """Candidate indices in cascade order: `wanted` (names) in the given order, or, when empty, every
    candidate by expected cost, ties to the smaller model."""
    if wanted:
        lower = {n.casefold(): i for i, n in enumerate(names)}
        missing = [w for w in wanted if w.casefold() not in lower]
        if missing:
            raise ValueError(f"routers.cascade_chain names unknown candidate(s) {missing}; known: {', '.join(names)}")
        return [lower[w.casefold()] for w in wanted]
    return sorted(range(len(names)), key=lambda i: (costs[i], params[i], i))


@register_router("cascade")
class CascadeRouter(ScriptedRouter):

    def fit(self) -> None:
        self.scorer = CorrectnessScorer(self.ctx)
        self.chain = cascade_chain(self.ctx.names, self.ctx.call_costs(), [s.params_b for s in self.ctx.pool.specs],
                                   list(self.ctx.options.cascade_chain))

    def settings(self):
        return [RouterSetting(f"τ={t:g}", float(t)) for t in self.ctx.options.thresholds]

    def episode_config(self, base):
        """One turn per candidate of the chain: the cascade may need all of them."""
        return dataclasses.replace(base, max_turns=max(base.max_turns, len(self.chain)))

    def turn_fn(self, questions, setting, golden=None):
        names, chain, threshold = self.ctx.names, self.chain, setting.value

        def turn(i, replies, rng):
            n = len(replies)
            if n:
                p = float(self.scorer.score([questions[i]], [chain[n - 1]], [replies[-1]])[0])
                if p >= threshold or n == len(chain):
                    return answer_chunk(self.ctx.answerer.answer(i, questions[i], replies[-1]))
            m = chain[n]
            why = "start with the cheapest candidate" if n == 0 else f"P(right)={p:.2f} < {threshold:g}: escalate"
            return call_chunk(why, names[m], questions[i])
        return turn
