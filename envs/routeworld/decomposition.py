"""How an episode treats a two-hop question: asked whole, or hop by hop (one call per hop, the second
naming the first's answer). Issue 22 compares how many two-hop questions a policy splits with how
many the oracle plan splits."""

from __future__ import annotations

from typing import Mapping, Sequence

from envs.routeworld.world import World


def hop_split(world: World, summary: Mapping) -> bool | None:
    """Whether an episode (its summary: `question` and `calls`) asked a two-hop question hop by hop:
    some call asks one of the world's one-hop questions. None when the question is not two-hop."""
    query = world.lookup(summary["question"])
    if query is None or len(query.relations) < 2:
        return None
    asked = (world.lookup(c["query"]) for c in summary["calls"])
    return any(q is not None and len(q.relations) == 1 for q in asked)


def decomposition_stats(world: World, summaries: Sequence[Mapping]) -> dict[str, float]:
    """Means over episodes of `two_hop` (the question has two hops) and `hop_split` (it has two and
    was asked hop by hop); hop_split / two_hop is the share of two-hop questions split. Means, not
    counts, so ranks' figures average like every other metric."""
    splits = [hop_split(world, s) for s in summaries]
    n = max(len(splits), 1)
    return {"two_hop": sum(s is not None for s in splits) / n, "hop_split": sum(bool(s) for s in splits) / n}
