"""Ensemble: ask every candidate the whole question and answer with the reply the correctness scorer
ranks highest (ties: the cheaper candidate). It pays for every call."""

from __future__ import annotations

import dataclasses

import numpy as np

from agents.routers.base import ScriptedRouter, register_router
from agents.routers.scorer import CorrectnessScorer
from envs.chunks import answer_chunk, call_chunk


@register_router("ensemble")
class EnsembleRouter(ScriptedRouter):

    def fit(self) -> None:
        self.scorer = CorrectnessScorer(self.ctx)
        self.order = list(np.argsort(self.ctx.call_costs(), kind="stable"))  # cheapest first: ties go to it

    def episode_config(self, base):
        """One turn per candidate."""
        return dataclasses.replace(base, max_turns=max(base.max_turns, len(self.ctx.names)))

    def turn_fn(self, questions, setting, golden=None):
        names, order = self.ctx.names, self.order

        def turn(i, replies, rng):
            n = len(replies)
            if n < len(order):
                return call_chunk(f"ask every candidate ({n + 1} of {len(order)})", names[order[n]], questions[i])
            p = self.scorer.score([questions[i]] * n, order, replies)
            best = int(np.argmax(p))  # first maximum: the cheapest among equals
            return answer_chunk(self.ctx.answerer.answer(i, questions[i], replies[best]))
        return turn
