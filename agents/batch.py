"""RolloutBatch: finished episodes as token-aligned (B, T) tensors, and its micro-batches."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from envs.episode import Episode


@dataclass
class RolloutBatch:
    """Per-token tensors are (B, T), right-padded, aligned with `input_ids`: `action_mask` is 1 only
    where the policy generated the token (0 on prompt, padding and env-inserted `<info>` tokens).
    Per-episode tensors are (B,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    action_mask: torch.Tensor
    token_rewards: torch.Tensor  # outcome reward on the last action token (+ KL penalty if in reward)
    sampler_logprobs: torch.Tensor  # what the sampler saw; only compared with old_logprobs
    group_ids: torch.Tensor
    scores: torch.Tensor  # the episode's total reward
    raw_cost: torch.Tensor
    turns: torch.Tensor
    calls: torch.Tensor
    source_rows: torch.Tensor | None = None  # a relabelled row's sampled row (agents.relabel), -1 for a sampled one
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def map(self, fn) -> "RolloutBatch":
        return RolloutBatch(**{f.name: (fn(v) if v is not None else None)
                               for f in dataclasses.fields(self) for v in [getattr(self, f.name)]})

    def to(self, device) -> "RolloutBatch":
        return self.map(lambda t: t.to(device))

    def select(self, rows: torch.Tensor) -> "RolloutBatch":
        """Rows `rows`, with trailing all-padding columns trimmed."""
        sub = self.map(lambda t: t[rows])
        width = int(sub.attention_mask.sum(1).max())
        return sub.map(lambda t: t[:, :width] if t.dim() == 2 else t)


def build_batch(episodes: Sequence[Episode], scores: Sequence[float], group_ids: Sequence[int],
                sampler_logprobs: Sequence[Sequence[float]], pad_id: int,
                source_rows: Sequence[int] | None = None) -> RolloutBatch:
    """Stack finished episodes: prompt + response ids, masks, and the outcome reward placed on the
    last action token (an episode without action tokens cannot carry a reward: an error).
    `source_rows` marks relabelled copies (agents.relabel): the row each copies, -1 for sampled rows."""
    B = len(episodes)
    T = max(len(e.prompt_ids) + len(e.response_ids) for e in episodes)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    action_mask = torch.zeros(B, T)
    token_rewards = torch.zeros(B, T)
    sampler = torch.zeros(B, T)
    for b, e in enumerate(episodes):
        n_prompt, ids = len(e.prompt_ids), e.prompt_ids + e.response_ids
        input_ids[b, :len(ids)] = torch.tensor(ids)
        attention_mask[b, :len(ids)] = 1
        acts = [n_prompt + t for t, ins in enumerate(e.inserted) if not ins]
        if not acts:
            raise ValueError(f"episode {b} has no policy token to carry its reward")
        action_mask[b, acts] = 1.0
        sampler[b, acts] = torch.tensor(list(sampler_logprobs[b]), dtype=torch.float)
        token_rewards[b, acts[-1]] = float(scores[b])
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return RolloutBatch(
        input_ids, attention_mask, position_ids, action_mask, token_rewards, sampler,
        group_ids=torch.as_tensor(list(group_ids), dtype=torch.long),
        scores=torch.tensor([float(s) for s in scores]),
        raw_cost=torch.tensor([e.raw_cost for e in episodes]),
        turns=torch.tensor([e.turns for e in episodes]),
        calls=torch.tensor([len(e.calls) for e in episodes]),
        source_rows=torch.as_tensor([-1] * B if source_rows is None else list(source_rows), dtype=torch.long),
    )


def micro_batch_rows(lengths: Sequence[int], token_budget: int, packed: bool = False) -> list[torch.Tensor]:
    """Row indices of micro-batches: rows sorted by length (an optimizer step's loss sums over all
    of its rows, so their order is free and sorting keeps padding low), split before a row that
    would take a micro-batch past `token_budget` tokens: rows x the longest row when padded, the sum
    of the lengths when `packed`. A row longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, cur, width, total = [], [], 0, 0
    for i in order:
        n = lengths[i]
        cost = total + n if packed else max(width, n) * (len(cur) + 1)
        if cur and cost > token_budget:
            out.append(torch.tensor(cur))
            cur, width, total = [], 0, 0
        cur.append(i)
        width, total = max(width, n), total + n
    return out + [torch.tensor(cur)]


def micro_batches(batch: RolloutBatch, token_budget: int, packed: bool = False) -> list[RolloutBatch]:
    """The rows of `batch` in micro-batches of `micro_batch_rows`."""
    lengths = batch.attention_mask.sum(1).tolist()
    return [batch.select(rows) for rows in micro_batch_rows(lengths, token_budget, packed)]
