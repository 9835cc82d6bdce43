"""Reward-guided cluster routing: label each training query with its best candidate, cluster the query
features with K-means (K by silhouette), and fit one small classifier per cluster that predicts the
best candidate; a test query goes to its nearest cluster's classifier."""

from __future__ import annotations

import numpy as np
import torch

from agents.routers.base import SingleCallRouter, register_router
from agents.routers.fit import seeded_init
from agents.routers.kmeans import choose_k, kmeans, sq_dists


def fit_softmax(x: np.ndarray, labels: np.ndarray, n_classes: int, epochs: int, lr: float,
                g: torch.Generator) -> torch.nn.Module:
    """Multinomial logistic regression (one linear layer) by full-batch Adam on cross-entropy."""
    model = seeded_init(torch.nn.Linear(x.shape[1], n_classes), g)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(labels)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@register_router("regroup")
class RegroupRouter(SingleCallRouter):
    """Labels: `OutcomeData.best` (highest recorded quality, ties to the cheaper). A cluster whose
    members share one label routes to it without a classifier."""


    def fit(self) -> None:
        train, opt = self.ctx.train(), self.ctx.options
        x = self.ctx.features(train.questions).astype(np.float64)
        rng = np.random.default_rng(opt.seed)
        self.k, self.silhouettes = choose_k(x, range(opt.regroup_k_min, opt.regroup_k_max + 1), rng,
                                            opt.silhouette_sample)
        self.centers, clusters = kmeans(x, self.k, rng)
        labels = train.best()
        g = torch.Generator().manual_seed(opt.seed)
        self.heads: list[torch.nn.Module | int] = []
        fallback = int(np.bincount(labels, minlength=len(self.ctx.names)).argmax())
        for c in range(self.k):
            members = clusters == c
            classes = np.unique(labels[members])
            if len(classes) == 0:
                self.heads.append(fallback)
            elif len(classes) == 1:
                self.heads.append(int(classes[0]))
            else:
                self.heads.append(fit_softmax(x[members], labels[members], len(self.ctx.names),
                                              opt.epochs * 10, opt.lr * 10, g))

    def choose(self, questions, setting, rng):
        x = self.ctx.features(questions).astype(np.float64)
        clusters = sq_dists(x, self.centers).argmin(1)
        out = np.zeros(len(questions), dtype=int)
        for i, c in enumerate(clusters):
            head = self.heads[c]
            if isinstance(head, int):
                out[i] = head
            else:
                with torch.no_grad():
                    out[i] = int(head(torch.as_tensor(x[i:i + 1], dtype=torch.float32)).argmax())
        return out
