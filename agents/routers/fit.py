"""Small seeded torch fits shared by the learned routers: weights drawn from a generator of their
own, minibatches in an order drawn from it, binary cross-entropy against soft targets."""

from __future__ import annotations

import math

import numpy as np
import torch


def seeded_init(module: torch.nn.Module, g: torch.Generator) -> torch.nn.Module:
    """Re-draw every parameter from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with `g` (torch's default
    Linear range), so results never depend on the global torch generator."""
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else p.shape[0]
            bound = 1.0 / math.sqrt(max(fan_in, 1))
            p.uniform_(-bound, bound, generator=g)
    return module


def fit_bce(model: torch.nn.Module, inputs: tuple[np.ndarray, ...], targets: np.ndarray, epochs: int, lr: float,
            batch_size: int, g: torch.Generator, mask: np.ndarray | None = None) -> list[float]:
    """Minimise mean BCE(sigmoid(model(*inputs)), targets) with Adam; `mask` (same shape as targets)
    weights entries (0 = ignored). Returns the mean loss of each epoch."""
    xs = [torch.as_tensor(x) for x in inputs]
    y = torch.as_tensor(targets, dtype=torch.float32)
    w = torch.ones_like(y) if mask is None else torch.as_tensor(mask, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        total = 0.0
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            logits = model(*(x[idx] for x in xs))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx], weight=w[idx], reduction="sum")
            loss = loss / w[idx].sum().clamp_min(1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(y))
    model.eval()
    return losses


@torch.no_grad()
def predict_proba(model: torch.nn.Module, *inputs: np.ndarray) -> np.ndarray:
    """sigmoid(model(*inputs)) as numpy."""
    return torch.sigmoid(model(*(torch.as_tensor(x) for x in inputs))).numpy()
