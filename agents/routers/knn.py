"""k-nearest-neighbour router: a question's predicted quality per candidate is the mean over its k
most similar training questions (cosine of query features); pick quality - lambda * cost."""

from __future__ import annotations

import numpy as np

from agents.routers.base import SingleCallRouter, lambda_settings, quality_cost_choice, register_router


def knn_quality(train_x: np.ndarray, train_quality: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """(Q, M) mean quality of the k training rows with the highest dot product (cosine for
    L2-normalised features) with each row of `x`; ties broken by training order."""
    k = min(k, len(train_x))
    out = np.zeros((len(x), train_quality.shape[1]))
    for start in range(0, len(x), 256):
        sims = x[start:start + 256] @ train_x.T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        out[start:start + 256] = train_quality[top].mean(axis=1)
    return out


@register_router("knn")
class KNNRouter(SingleCallRouter):

    def fit(self) -> None:
        train = self.ctx.train()
        self.train_x = self.ctx.features(train.questions)
        self.quality, self.costs = train.quality, self.ctx.call_costs()

    def settings(self):
        return lambda_settings(self.ctx.options.lambdas)

    def choose(self, questions, setting, rng):
        x = self.ctx.features(questions)
        return quality_cost_choice(knn_quality(self.train_x, self.quality, x, self.ctx.options.knn_k),
                                   self.costs, setting.value)
