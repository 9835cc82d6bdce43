"""MultiRouteVectorEnv: B episodes advanced by chunks of policy tokens, candidate calls made
concurrently. It is the batched face of the same episode state machine as MultiRouteEnv."""

from __future__ import annotations

import concurrent.futures
from typing import Any, Sequence

from envs.candidates.pool import CandidatePool
from envs.episode import (CALLING, Episode, EpisodeConfig, RewardFn, eos_token_ids, insert_replies,
                          make_episodes, submit_calls)
from rewards import RewardBreakdown, compute_reward
from rewards.cost import CostNormalizer


class MultiRouteVectorEnv:
    """Runs a fixed list of episodes (one rollout phase) until all of them end.

    Not a `gymnasium.vector.VectorEnv`: episodes advance by variable-length chunks (the rollout
    engine generates until a stop tag, then hands over), and there is no autoreset. Rewards are
    computed by `finish`, after the caller has updated the cost normalizer with the whole batch.
    """

    def __init__(self, tokenizer, pool: CandidatePool, config: EpisodeConfig | None = None,
                 reward_fn: RewardFn = compute_reward, extra_eos_ids: Sequence[int] = ()):
        self.tokenizer, self.pool = tokenizer, pool
        self.cfg = config or EpisodeConfig()
        self.reward_fn = reward_fn
        self.eos_ids = eos_token_ids(tokenizer, extra_eos_ids)
        self.episodes: list[Episode] = []
        self._calls: dict[int, concurrent.futures.Future | None] = {}  # by episode: its call out (`submit`)

    def reset(self, examples: Sequence[Any]) -> list[list[int]]:
        """Start one episode per example; return their prompt ids."""
        self.episodes = make_episodes(examples, self.tokenizer, self.pool, self.cfg, self.eos_ids)
        self._calls = {}
        return [e.prompt_ids for e in self.episodes]

    def add(self, examples: Sequence[Any]) -> list[int]:
        """Start one more episode per example beside those running (a server's new requests join a
        rollout phase); return their indices."""
        start = len(self.episodes)
        self.episodes += make_episodes(examples, self.tokenizer, self.pool, self.cfg, self.eos_ids)
        return list(range(start, len(self.episodes)))

    @property
    def active(self) -> list[int]:
        return [i for i, e in enumerate(self.episodes) if not e.done]

    def push(self, i: int, token: int) -> str:
        """Append one policy token to episode i; returns its state (generating, calling or done)."""
        return self.episodes[i].push(token)

    def push_many(self, i: int, tokens: Sequence[int]) -> int:
        """Append policy tokens to episode i until its state leaves generating; returns how many it took."""
        return self.episodes[i].push_many(tokens)

    def resolve(self) -> dict[int, list[int]]:
        """Make the pending calls of all calling episodes concurrently; return inserted ids by episode."""
        self.submit()
        return self.collect(window=None)

    def submit(self) -> None:
        """Start the call of every calling episode that has none out, in the background."""
        new = [i for i, e in enumerate(self.episodes) if e.state == CALLING and i not in self._calls]
        self._calls.update(zip(new, submit_calls([self.episodes[i] for i in new], self.pool)))

    @property
    def calls_out(self) -> int:
        """Calls submitted whose replies are not inserted yet."""
        return len(self._calls)

    def collect(self, window: float | None = 0.0, block: bool = False) -> dict[int, list[int]]:
        """Insert the replies that have arrived and return the inserted ids by episode. Waits up to
        `window` seconds (None: no limit) for every call out, then, with `block`, for at least one."""
        futures = [f for f in self._calls.values() if f is not None]
        if futures and window != 0:
            concurrent.futures.wait(futures, timeout=window)
        if block and futures and not any(f is None or f.done() for f in self._calls.values()):
            concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
        done = [i for i, f in self._calls.items() if f is None or f.done()]
        calls = [self._calls.pop(i) for i in done]
        inserted = insert_replies([self.episodes[i] for i in done], [f.result() if f else None for f in calls])
        return dict(zip(done, inserted))

    def finish(self, cost_normalizer: CostNormalizer | None = None) -> list[tuple[RewardBreakdown, dict]]:
        """Score every episode (all must have ended) with the given, already-updated normalizer."""
        out = []
        for e in self.episodes:
            reward = e.score(cost_normalizer, self.reward_fn)
            out.append((reward, e.summary(reward)))
        return out
