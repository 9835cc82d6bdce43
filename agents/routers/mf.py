"""Matrix-factorisation router (RouteLLM / RouterBench style): P(candidate m answers query q) =
sigmoid(<W x_q, v_m> + b_m), with x_q the query features, W a learned projection and v_m a learned
embedding per candidate; pick quality - lambda * cost."""

from __future__ import annotations

import torch

from agents.routers.base import register_router
from agents.routers.mlp import QualityNetRouter


class BilinearScores(torch.nn.Module):
    """(B, D) query features -> (B, M) logits <W x, v_m> + b_m."""

    def __init__(self, dim: int, n_candidates: int, latent: int):
        super().__init__()
        self.project = torch.nn.Linear(dim, latent, bias=False)
        self.candidates = torch.nn.Parameter(torch.empty(n_candidates, latent))
        self.bias = torch.nn.Parameter(torch.empty(n_candidates))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x) @ self.candidates.T + self.bias


@register_router("mf")
class MFRouter(QualityNetRouter):

    def make_net(self, dim: int) -> torch.nn.Module:
        return BilinearScores(dim, len(self.ctx.names), self.ctx.options.mf_dim)
