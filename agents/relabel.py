"""Cost-weight relabelling for a conditioned policy: every sampled episode is also trained as if its
prompt had stated each other weight the policy is trained for (episode.alpha's sample set).

A conditioned policy must learn how the best call depends on alpha, yet two episodes drawn at two
alphas share nothing but the shared weights. The reward is a known function of alpha, so one
episode's outcome (its answer and cost) scores it under every alpha, as hindsight relabelling does
for goals (Andrychowicz et al. 2017, HER) and for objective weights (Yang et al. 2019, envelope
multi-objective RL). The relabelled copy states alpha' wherever the episode stated alpha (the
prompt's words and the policy's own restatement of them), is scored by the episode's reward
function at alpha', and forms its own group of the same question. Its tokens were sampled under
alpha, so its advantage is weighted by the truncated sequence ratio (Espeholt et al. 2018, V-trace)
    w = min(1, pi_old(tau' | alpha') / pi_old(tau | alpha)),
which is 1 while the policy ignores alpha and falls as it learns not to act so at alpha'.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from envs.episode import Episode
from envs.prompts import condition_text


def cue_ids(tokenizer, alpha: float) -> list[int]:
    """The token ids of the words that state `alpha` ("Cost weight: 0.8.")."""
    return tokenizer.encode(condition_text(alpha).strip(), add_special_tokens=False)


def swap_runs(ids: Sequence[int], flags: Sequence[bool], old: Sequence[int], new: Sequence[int]) -> tuple[list[int], list[bool], int]:
    """`ids` with every run equal to `old` (whose tokens all share one flag) replaced by `new`, the
    flags carried over, and how many runs were replaced."""
    out_ids, out_flags, i, n = [], [], 0, 0
    k = len(old)
    while i < len(ids):
        if list(ids[i:i + k]) == list(old) and len(set(flags[i:i + k])) == 1:
            out_ids += list(new)
            out_flags += [flags[i]] * len(new)
            i, n = i + k, n + 1
        else:
            out_ids.append(ids[i])
            out_flags.append(flags[i])
            i += 1
    return out_ids, out_flags, n


def relabel(episode: Episode, alpha: float, tokenizer) -> Episode:
    """A copy of a finished episode that states `alpha` where it stated its own: the same calls,
    replies and answer, with `alpha` for the reward. Its prompt must state the weight in words the
    tokenizer keeps whole (a conditioned prompt does), else relabelling cannot find them: an error."""
    old, new = cue_ids(tokenizer, episode.alpha), cue_ids(tokenizer, alpha)
    prompt, _, found = swap_runs(episode.prompt_ids, [True] * len(episode.prompt_ids), old, new)
    if not found:
        raise ValueError(f"alpha relabelling: the prompt does not hold the tokens of "
                         f"{condition_text(episode.alpha).strip()!r}; it needs a conditioned prompt whose "
                         "tokenizer encodes the cost weight's words the same in context and alone")
    response, inserted, _ = swap_runs(episode.response_ids, episode.inserted, old, new)
    out = copy.copy(episode)  # calls, text and state are shared and only read from here on
    out.prompt_ids, out.response_ids, out.inserted, out.alpha = prompt, response, inserted, float(alpha)
    return out


def check_cues(prompt_ids: Sequence[Sequence[int]], alphas: Sequence[float], tokenizer) -> None:
    """Refuse relabelling (before any model loads) when a prompt stating one of `alphas` does not hold
    that weight's words as `cue_ids` encodes them alone, so a copy could not restate it."""
    for ids, a in zip(prompt_ids, alphas):
        if not swap_runs(ids, [True] * len(ids), cue_ids(tokenizer, a), [])[2]:
            raise ValueError(f"algorithm.relabel_alpha: the tokenizer encodes {condition_text(a).strip()!r} "
                             "differently inside the prompt than alone, so relabelling cannot restate it; "
                             "turn algorithm.relabel_alpha off for this tokenizer")


def relabelled(episodes: Sequence[Episode], alphas: Sequence[float], tokenizer) -> tuple[list[Episode], list[int], list[int]]:
    """Each episode restated at each weight of `alphas` other than its own: the copies, the index of
    the episode each copies, and which of the other weights (1, 2, ...) it states, for its group."""
    copies, sources, slots = [], [], []
    for i, e in enumerate(episodes):
        others = [a for a in alphas if abs(a - e.alpha) > 1e-9]
        for j, a in enumerate(others, 1):
            copies.append(relabel(e, a, tokenizer))
            sources.append(i)
            slots.append(j)
    return copies, sources, slots


def truncated_ratio(old_logprobs: torch.Tensor, action_mask: torch.Tensor, source_rows: torch.Tensor) -> torch.Tensor:
    """Per row, min(1, pi_old(tau'|alpha') / pi_old(tau|alpha)) for a relabelled row (its `source_rows`
    entry is the sampled row it copies) and 1 for a sampled row (entry -1)."""
    seq = (old_logprobs * action_mask).sum(1)
    w = torch.ones_like(seq)
    copies = (source_rows >= 0).nonzero().squeeze(-1)
    if copies.numel():
        w[copies] = torch.exp(seq[copies] - seq[source_rows[copies]]).clamp(max=1.0)
    return w
