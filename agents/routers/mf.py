"""Matrix-factorisation router (RouteLLM / RouterBench style): P(candidate m answers query q) =
sigmoid(<W x_q, v_m> + b_m), with x_q the query features, W a learned projection and v_m a learned
embedding per candidate; pick quality - lambda * cost."""

from __future__ import annotations

import torch

from agents.routers.base import SingleCallRouter, lambda_settings, quality_cost_choice
from agents.routers.fit import fit_bce, predict_proba, seeded_init


class BilinearScores(torch.nn.Module):
    """(B, D) query features -> (B, M) logits <W x, v_m> + b_m."""

    def __init__(self, dim: int, n_candidates: int, latent: int):
        super().__init__()
        self.project = torch.nn.Linear(dim, latent, bias=False)
        self.candidates = torch.nn.Parameter(torch.empty(n_candidates, latent))
        self.bias = torch.nn.Parameter(torch.empty(n_candidates))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x) @ self.candidates.T + self.bias


class MFRouter(SingleCallRouter):
    name = "mf"

    def fit(self) -> None:
        train, opt = self.ctx.train(), self.ctx.options
        x = self.ctx.features(train.questions)
        g = torch.Generator().manual_seed(opt.seed)
        self.net = seeded_init(BilinearScores(x.shape[1], len(self.ctx.names), opt.mf_dim), g)
        self.losses = fit_bce(self.net, (x,), train.quality.astype("float32"), opt.epochs, opt.lr, opt.batch_size, g)
        self.costs = self.ctx.call_costs()

    def settings(self):
        return lambda_settings(self.ctx.options.lambdas)

    def choose(self, questions, setting, rng):
        predicted = predict_proba(self.net, self.ctx.features(questions))
        return quality_cost_choice(predicted, self.costs, setting.value)
