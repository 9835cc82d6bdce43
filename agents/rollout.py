"""The rollout engine: batched sampling with a KV cache until each episode stops at a tag, then the
env's concurrent candidate calls, then the next segment, until every episode of the phase ends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from agents.sampling import sample_tokens
from envs.conditioning import stream_key
from envs.episode import GENERATING, EpisodeConfig
from envs.vector import MultiRouteVectorEnv


def episode_seed(seed: int, step: int, index: int) -> int:
    """The 63-bit key of one episode's sampling stream, from (seed, step, episode index)."""
    return stream_key(seed, step, index)


def episode_generator(seed: int, step: int, index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The sampling stream of one episode, keyed by (seed, step, episode index): results do not
    depend on batch layout or on which rank runs the episode."""
    g = torch.Generator(device=device)
    g.manual_seed(episode_seed(seed, step, index))
    return g


@dataclass
class ForcedSchedule:
    """Token ids written instead of sampled ones when an episode reaches a number of policy tokens
    (benchmarks and random-weight runs): `chunks[position]` is written from that position on."""

    chunks: dict[int, list[int]]

    @classmethod
    def calls_then_answer(cls, tokenizer, candidate: str, turns: list[int], answer_at: int) -> "ForcedSchedule":
        call = tokenizer.encode(f" </think>\n<search> {candidate}: forced question? </search>", add_special_tokens=False)
        answer = tokenizer.encode(" </think>\n<answer> forced </answer>", add_special_tokens=False)
        return cls({**{p: call for p in turns}, answer_at: answer})


def episode_room(cfg: EpisodeConfig) -> int:
    """A bound on the tokens an episode adds after its prompt: the policy's token limit and every
    allowed reply (one more for a refused search's message), each with its tags."""
    return cfg.max_response_tokens + (cfg.max_turns + 1) * (cfg.max_info_tokens + 32)


@dataclass
class RolloutStats:
    generated_tokens: int = 0
    segments: int = 0


def _left_pad(contexts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(contexts), width, dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, width - len(c):] = torch.tensor(c)
        mask[i, width - len(c):] = 1
    return ids.to(device), mask.to(device)


# feed(env) starts more episodes in a running phase with `env.add` (a server's new requests) and may
# end generating ones with `Episode.truncate`; the engines call it at every boundary where episodes
# can join (before a segment, before a decode burst)
Feed = Callable[[MultiRouteVectorEnv], None]


@torch.no_grad()
def run_rollouts(model, env: MultiRouteVectorEnv, examples: list, temperature: float, top_p: float,
                 seed: int, step: int, pad_id: int, index_offset: int = 0,
                 forced: ForcedSchedule | None = None, engine=None,
                 feed: Feed | None = None) -> tuple[list[list[float]], RolloutStats]:
    """Play one rollout phase: every example's episode, all with the same weights, until all end.

    Each segment left-pads the contexts of the running episodes, prefills them once, and decodes
    token by token with the KV cache; an episode leaves the segment when it closes `</search>` or
    `</answer>`, samples EOS, or hits its token limit. Then all pending calls are made concurrently
    and the replies inserted. Returns the sampler's log-prob of every policy token, per episode.
    `engine` (an `agents.fast_decode.FastEngine` built from `model`) plays the phase instead, with
    the same results under greedy decoding and its own keyed sampling stream otherwise.
    `feed`, called before every segment, starts more episodes in the phase (see `Feed`); the phase
    ends when no episode runs after it was called.
    """
    if engine is not None:
        return engine.run(env, examples, temperature, top_p, seed, step, pad_id, index_offset, forced, feed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    env.reset(examples)
    gens: list[torch.Generator] = []
    logps: list[list[float]] = []
    queues: list[list[int]] = []  # forced tokens still to write, per episode
    stats = RolloutStats()
    while True:
        if feed is not None:
            feed(env)
        for i in range(len(gens), len(env.episodes)):  # the phase's examples, then those `feed` added
            gens.append(episode_generator(seed, step, index_offset + i))
            logps.append([])
            queues.append([])
        if not env.active:
            break
        rows = env.active
        ids, mask = _left_pad([env.episodes[i].prompt_ids + env.episodes[i].response_ids for i in rows], pad_id, device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        past, last = out.past_key_values, out.logits[:, -1]
        running = torch.ones(len(rows), dtype=torch.bool)
        next_pos = positions[:, -1] + 1
        stats.segments += 1
        while True:
            next_ids = torch.full((len(rows),), pad_id, dtype=torch.long)
            live = running.nonzero().squeeze(-1).tolist()
            tokens, token_logps = sample_tokens(last[live], temperature, top_p, [gens[rows[r]] for r in live])
            for r, token, logp in zip(live, tokens.tolist(), token_logps.tolist()):
                i = rows[r]
                if forced is not None:
                    queues[i] = queues[i] or list(forced.chunks.get(env.episodes[i].policy_tokens, []))
                    if queues[i]:
                        token = queues[i].pop(0)
                        logp = float(torch.log_softmax(last[r].float() / (temperature or 1.0), -1)[token])
                logps[i].append(logp)
                next_ids[r] = token
                stats.generated_tokens += 1
                if env.push(i, token) != GENERATING:
                    running[r] = False
            if not running.any():
                break
            mask = torch.cat([mask, running.long().to(device)[:, None]], 1)
            out = model(input_ids=next_ids.to(device)[:, None], attention_mask=mask,
                        position_ids=next_pos[:, None], past_key_values=past, use_cache=True)
            past, last = out.past_key_values, out.logits[:, -1]
            next_pos = next_pos + 1
        env.resolve()
    model.train(was_training)
    return logps, stats
