"""MLP router: a two-layer network maps query features to each candidate's probability of a right
answer (trained on per-query outcomes); pick quality - lambda * cost. `QualityNetRouter` is the
shared rule for any such network (the MF router reuses it with another net)."""

from __future__ import annotations

import torch

from agents.routers.base import SingleCallRouter, lambda_settings, quality_cost_choice, register_router
from agents.routers.fit import fit_bce, predict_proba, seeded_init


class QualityNetRouter(SingleCallRouter):
    """Fit `make_net(feature_dim)` to per-candidate correctness (BCE); route to argmax of
    predicted quality - lambda * cost, one point of the curve per lambda."""

    def make_net(self, dim: int) -> torch.nn.Module:
        raise NotImplementedError

    def fit(self) -> None:
        train, opt = self.ctx.train(), self.ctx.options
        x = self.ctx.features(train.questions)
        g = torch.Generator().manual_seed(opt.seed)
        self.net = seeded_init(self.make_net(x.shape[1]), g)
        self.losses = fit_bce(self.net, (x,), train.quality.astype("float32"), opt.epochs, opt.lr, opt.batch_size, g)
        self.costs = self.ctx.call_costs()

    def settings(self):
        return lambda_settings(self.ctx.options.lambdas)

    def choose(self, questions, setting, rng):
        predicted = predict_proba(self.net, self.ctx.features(questions))
        return quality_cost_choice(predicted, self.costs, setting.value)


@register_router("mlp")
class MLPRouter(QualityNetRouter):

    def make_net(self, dim: int) -> torch.nn.Module:
        hidden = self.ctx.options.hidden
        return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
                                   torch.nn.Linear(hidden, len(self.ctx.names)))
