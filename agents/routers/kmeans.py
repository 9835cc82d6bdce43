"""K-means (k-means++ seeding, Lloyd iterations) and the silhouette score, in numpy, for regroup."""

from __future__ import annotations

import numpy as np


def sq_dists(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """(N, K) squared Euclidean distances, clipped at 0 against rounding."""
    return np.maximum((x * x).sum(1)[:, None] - 2 * x @ centers.T + (centers * centers).sum(1)[None, :], 0.0)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(centers (k, D), labels (N,)) of Lloyd's algorithm from k-means++ seeds (Arthur & Vassilvitskii
    2007): each next seed drawn with probability proportional to its squared distance to the nearest
    seed. An emptied cluster keeps its old center. Stops when no label changes."""
    if not 1 <= k <= len(x):
        raise ValueError(f"kmeans: k={k} must lie in [1, {len(x)}] (the number of points)")
    x = x.astype(np.float64)
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = sq_dists(x, np.array(centers)).min(1)
        total = d.sum()
        centers.append(x[rng.choice(len(x), p=d / total)] if total > 0 else x[rng.integers(len(x))])
    centers = np.array(centers)
    labels = np.full(len(x), -1)
    for _ in range(iters):
        new = sq_dists(x, centers).argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = x[labels == c]
            if len(members):
                centers[c] = members.mean(0)
    return centers, labels


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (b - a) / max(a, b) over points, Euclidean distances (Rousseeuw 1987): a is the
    mean distance to the other members of the point's cluster, b the smallest mean distance to another
    cluster; a point alone in its cluster scores 0. Needs at least 2 clusters."""
    ids = np.unique(labels)
    if len(ids) < 2:
        raise ValueError(f"silhouette needs at least 2 clusters, got {len(ids)}")
    x = x.astype(np.float64)
    dist = np.sqrt(np.maximum((x * x).sum(1)[:, None] - 2 * x @ x.T + (x * x).sum(1)[None, :], 0.0))
    sums = np.stack([dist[:, labels == c].sum(1) for c in ids], axis=1)  # (N, C)
    sizes = np.array([(labels == c).sum() for c in ids])
    own = np.searchsorted(ids, labels)
    n_own = sizes[own]
    a = sums[np.arange(len(x)), own] / np.maximum(n_own - 1, 1)
    mean_other = sums / sizes[None, :]
    mean_other[np.arange(len(x)), own] = np.inf
    b = mean_other.min(1)
    s = np.where(n_own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def choose_k(x: np.ndarray, k_range: range, rng: np.random.Generator, sample: int) -> tuple[int, dict[int, float]]:
    """The K of `k_range` whose K-means clustering has the highest silhouette (ties: the smaller K),
    scored on at most `sample` points drawn once from `rng`; returns K and every K's score."""
    pick = rng.choice(len(x), size=min(sample, len(x)), replace=False)
    scores = {}
    for k in k_range:
        if k >= len(pick):
            break
        _, labels = kmeans(x[pick], k, rng)
        scores[k] = silhouette(x[pick], labels) if len(np.unique(labels)) > 1 else -1.0
    if not scores:
        raise ValueError(f"choose_k: no K in {list(k_range)} is below the {len(pick)} points")
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, scores
