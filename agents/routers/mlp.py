"""MLP router: a two-layer network maps query features to each candidate's probability of a right
answer (trained on per-query outcomes); pick quality - lambda * cost."""

from __future__ import annotations

import torch

from agents.routers.base import SingleCallRouter, lambda_settings, quality_cost_choice
from agents.routers.fit import fit_bce, predict_proba, seeded_init


class MLPRouter(SingleCallRouter):
    name = "mlp"

    def fit(self) -> None:
        train, opt = self.ctx.train(), self.ctx.options
        x = self.ctx.features(train.questions)
        g = torch.Generator().manual_seed(opt.seed)
        self.net = seeded_init(torch.nn.Sequential(torch.nn.Linear(x.shape[1], opt.hidden), torch.nn.ReLU(),
                                                   torch.nn.Linear(opt.hidden, len(self.ctx.names))), g)
        self.losses = fit_bce(self.net, (x,), train.quality.astype("float32"), opt.epochs, opt.lr, opt.batch_size, g)
        self.costs = self.ctx.call_costs()

    def settings(self):
        return lambda_settings(self.ctx.options.lambdas)

    def choose(self, questions, setting, rng):
        predicted = predict_proba(self.net, self.ctx.features(questions))
        return quality_cost_choice(predicted, self.costs, setting.value)
