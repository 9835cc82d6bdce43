"""Fixed single-call routers: the largest, the cheapest, a uniformly random, or a named candidate
gets every whole question."""

from __future__ import annotations

import numpy as np

from agents.routers.base import SingleCallRouter, register_router


@register_router("fixed", arg="candidate")
class FixedRouter(SingleCallRouter):
    """`fixed:<candidate>`: every question goes to the named candidate (exact name, any case)."""


    def __init__(self, ctx, arg=None):
        super().__init__(ctx, arg)
        if not arg:
            raise ValueError(f"router 'fixed' needs a candidate, e.g. fixed:{ctx.names[0]}; known: {', '.join(ctx.names)}")
        matches = [i for i, n in enumerate(ctx.names) if n.casefold() == arg.strip().casefold()]
        if not matches:
            raise ValueError(f"router 'fixed:{arg}': no such candidate; known: {', '.join(ctx.names)}")
        self.index = matches[0]

    def choose(self, questions, setting, rng):
        return np.full(len(questions), self.index)


@register_router("largest")
class LargestRouter(SingleCallRouter):
    """The candidate with the most parameters (ties: the pricier, then the first listed)."""


    def choose(self, questions, setting, rng):
        specs = self.ctx.pool.specs
        best = max(range(len(specs)), key=lambda i: (specs[i].params_b, specs[i].price_per_1m_output, -i))
        return np.full(len(questions), best)


@register_router("cheapest")
class CheapestRouter(SingleCallRouter):
    """The candidate with the lowest expected cost of a call (ties: the first listed)."""


    def choose(self, questions, setting, rng):
        return np.full(len(questions), int(np.argmin(self.ctx.call_costs())))


@register_router("random")
class RandomRouter(SingleCallRouter):
    """A uniformly random candidate per question, drawn from the rng the evaluation passes in."""


    def choose(self, questions, setting, rng: np.random.Generator):
        return rng.integers(len(self.ctx.names), size=len(questions))
