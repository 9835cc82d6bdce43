"""MultiRouteEnv: the Router-R1 episode as a gymnasium.Env with one policy token per action."""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.candidates.pool import CandidatePool
from envs.conditioning import is_sampled
from envs.episode import (DONE, Episode, EpisodeConfig, RewardFn, eos_token_ids, make_episodes, resolve_calls,
                          with_conditions)
from rewards import compute_reward
from rewards.cost import CostNormalizer


class MultiRouteEnv(gym.Env):
    """One question per episode; an action is one token id of the policy's tokenizer.

    Observation of `reset`: the prompt ids. Observation of `step`: the ids the env appended in that
    step (the action, plus the `<info>` block after a call), so a policy keeps its own context and a
    step is O(1) in the episode length; `info["inserted"]` marks which of them the env wrote. The
    episode terminates at `</answer>`, an EOS token, or `max_response_tokens` policy tokens
    (`info["limit_reached"]`; terminated, not truncated: the format penalty is the true return).
    The reward is 0 until the last step. The cost normalizer is the paper's per-sample one (updated
    with each episode's cost, then read) unless `freeze_normalizer=True` (evaluation).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": None}

    def __init__(
        self,
        tokenizer,
        pool: CandidatePool,
        dataset: Sequence[Any] | None = None,
        config: EpisodeConfig | None = None,
        vocab_size: int | None = None,
        cost_normalizer: CostNormalizer | None = None,
        freeze_normalizer: bool = False,
        reward_fn: RewardFn = compute_reward,
        extra_eos_ids: Sequence[int] = (),
        render_mode: str | None = None,
    ):
        self.tokenizer, self.pool = tokenizer, pool
        self.dataset = list(dataset) if dataset is not None else None
        self.cfg = config or EpisodeConfig()
        self.cost_normalizer, self.freeze_normalizer = cost_normalizer, freeze_normalizer
        self.reward_fn = reward_fn
        self.eos_ids = eos_token_ids(tokenizer, extra_eos_ids)
        vocab = vocab_size or len(tokenizer)
        if vocab < len(tokenizer):
            raise ValueError(f"vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        self.action_space = spaces.Discrete(vocab)
        self.observation_space = spaces.Sequence(spaces.Discrete(vocab), stack=True)
        self.render_mode = render_mode
        self.episode: Episode | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and "question" in options:
            example = options
        elif self.dataset:
            example = self.dataset[int(self.np_random.integers(len(self.dataset)))]
        else:
            raise ValueError("reset() needs options={'question': ..., 'golden_answers': [...]} "
                             "or a dataset given at construction")
        if is_sampled(self.cfg.alpha) or is_sampled(self.cfg.max_cost):  # drawn from this env's own generator
            example = with_conditions([example], self.cfg, int(self.np_random.integers(2**63)), "reset")[0]
        self.episode = make_episodes([example], self.tokenizer, self.pool, self.cfg, self.eos_ids)[0]
        obs = np.asarray(self.episode.prompt_ids, dtype=np.int64)
        return obs, {"question": self.episode.question, "alpha": self.episode.alpha,
                     "max_cost": self.episode.max_cost}

    def step(self, action):
        ep = self.episode
        if ep is None or ep.done:
            raise RuntimeError("step() called before reset() or after the episode ended")
        token = int(action)
        if not 0 <= token < self.action_space.n:
            raise ValueError(f"action {token} is outside the vocabulary [0, {self.action_space.n})")
        ep.push(token)
        appended = [token] + resolve_calls([ep], self.pool)[0]
        obs = np.asarray(appended, dtype=np.int64)
        info: dict[str, Any] = {"inserted": np.array([False] + [True] * (len(appended) - 1))}
        reward = 0.0
        if ep.state == DONE:
            if self.cost_normalizer is not None and not self.freeze_normalizer:
                self.cost_normalizer.update([ep.raw_cost])
            breakdown = ep.score(self.cost_normalizer, self.reward_fn)
            reward = breakdown.total
            info.update(ep.summary(breakdown))
        return obs, reward, ep.state == DONE, False, info

    def render(self):
        if self.render_mode == "ansi" and self.episode is not None:
            return self.episode.text
        return None

    def close(self):
        self.pool.close()
