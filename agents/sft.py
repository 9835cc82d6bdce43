"""Supervised warm start: trajectories written by a script (or read from a file) are played through
the real env, so `<info>` blocks are real replies, and the policy is fit on its own tokens only."""

from __future__ import annotations

import json
import math
from typing import Callable, Sequence

import numpy as np
import torch

from agents.batch import build_batch, micro_batches
from agents.policy import sequence_logprobs
from envs.episode import CALLING, GENERATING
from envs.vector import MultiRouteVectorEnv

# scripted_turn(example, replies_so_far, rng, candidate_names) -> the next chunk of policy text
ScriptFn = Callable[[object, list, np.random.Generator, list], str]


def play_scripted(env: MultiRouteVectorEnv, examples: Sequence, script: ScriptFn, rng: np.random.Generator,
                  max_chunks: int = 16):
    """Run the script as the policy for every example; calls of a round are made concurrently."""
    env.reset(examples)
    replies: list[list[str]] = [[] for _ in examples]
    for _ in range(max_chunks):
        active = env.active
        if not active:
            break
        for i in active:
            ep = env.episodes[i]
            chunk = env.tokenizer.encode(script(examples[i], replies[i], rng, ep.candidate_names),
                                         add_special_tokens=False)
            if ep.push_many(chunk) < len(chunk) and ep.state == GENERATING:
                raise RuntimeError("scripted chunk was not consumed")
            if ep.state == GENERATING:  # the chunk did not end the turn: end it with EOS
                ep.push(next(iter(env.eos_ids)))
        calling = [i for i in active if env.episodes[i].state == CALLING]
        env.resolve()
        for i in calling:
            ep = env.episodes[i]
            replies[i].append(ep.calls[-1].reply if ep.calls and not ep.calls[-1].error else "")
    return env.episodes


def trajectories_from_jsonl(path: str) -> list[dict]:
    """Rows `{"question", "golden_answers", "turns": [policy text chunk, ...]}` for `play_scripted`."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for key in ("question", "golden_answers", "turns"):
                if not row.get(key):
                    raise ValueError(f"{path}:{n}: missing or empty field {key!r}")
            rows.append(row)
    return rows


def replay_turns(example, replies, rng, names) -> str:
    """A ScriptFn that replays the `turns` recorded in a trajectory file, one per call."""
    return example["turns"][min(len(replies), len(example["turns"]) - 1)]


def sft_train(model, episodes, pad_id: int, epochs: int, lr: float, batch_size: int, seed: int,
              token_budget: int = 16384, log: Callable[[dict], None] = lambda m: None) -> list[float]:
    """Maximise log p of the policy's tokens (env-inserted `<info>` tokens are masked, as in PPO)."""
    batch = build_batch(episodes, [0.0] * len(episodes), list(range(len(episodes))),
                        [[0.0] * e.policy_tokens for e in episodes], pad_id)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(batch) / batch_size)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max(total, 1))  # linear decay
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(batch), generator=g)
        for start in range(0, len(batch), batch_size):
            mb = batch.select(order[start:start + batch_size])
            n_tokens = float(mb.action_mask.sum())
            total_loss = 0.0
            for piece in micro_batches(mb, token_budget):
                piece = piece.to(device)
                logp, _ = sequence_logprobs(model, piece.input_ids, piece.attention_mask, piece.position_ids)
                loss = -(logp * piece.action_mask).sum() / n_tokens
                loss.backward()
                total_loss += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total_loss)
            log({"sft/epoch": epoch, "sft/loss": total_loss})
    return losses
