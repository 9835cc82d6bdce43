"""The correctness scorer of cascade and ensemble: P(a candidate's reply to a query is right) from the
query features, the candidate (one-hot) and, where the training outcomes record replies, the reply's
features. Trained on the training split's outcomes; it never sees a golden answer at test time."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from agents.routers.base import RouterContext
from agents.routers.fit import fit_bce, predict_proba, seeded_init


class CorrectnessScorer:
    """A two-layer MLP on [query features, one-hot candidate, reply features or nothing].

    `uses_replies` is True only when the training outcomes carry reply texts (RouteWorld, RouteLLM,
    `from_calls`); LLMRouter records scores but no replies, so there the scorer judges (query,
    candidate) alone, the same at training and at test time.
    """

    def __init__(self, ctx: RouterContext):
        self.ctx = ctx
        train, opt = ctx.train(), ctx.options
        self.uses_replies = train.replies is not None
        n_q, n_m = train.quality.shape
        rows_q = np.repeat(np.arange(n_q), n_m)
        rows_m = np.tile(np.arange(n_m), n_q)
        replies = [train.replies[q][m] for q, m in zip(rows_q, rows_m)] if self.uses_replies else None
        x = self._inputs(ctx.features(train.questions)[rows_q], rows_m, replies)
        g = torch.Generator().manual_seed(opt.seed + 1)
        self.net = seeded_init(torch.nn.Sequential(torch.nn.Linear(x.shape[1], opt.hidden), torch.nn.ReLU(),
                                                   torch.nn.Linear(opt.hidden, 1), torch.nn.Flatten(0)), g)
        epochs = max(1, opt.epochs // n_m)  # each question appears once per candidate in a pass
        self.losses = fit_bce(self.net, (x,), train.quality.reshape(-1).astype("float32"), epochs, opt.lr,
                              opt.batch_size, g)

    def _inputs(self, query_x: np.ndarray, candidates: np.ndarray, replies: Sequence[str] | None) -> np.ndarray:
        onehot = np.eye(len(self.ctx.names), dtype=np.float32)[candidates]
        parts = [query_x.astype(np.float32), onehot]
        if self.uses_replies:
            parts.append(self.ctx.features(list(replies)).astype(np.float32))
        return np.concatenate(parts, axis=1)

    def score(self, questions: Sequence[str], candidates: Sequence[int], replies: Sequence[str]) -> np.ndarray:
        """(N,) P(right) of `replies[i]`, given by candidate index `candidates[i]` to `questions[i]`."""
        x = self._inputs(self.ctx.features(questions), np.asarray(candidates), replies)
        return predict_proba(self.net, x)
