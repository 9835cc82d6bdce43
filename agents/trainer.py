"""The RL trainer, top to bottom: rollout, rewards, KL, advantages, PPO-style update epochs, logging,
evaluation and checkpoints. The algorithm is a config choice; nothing here branches on its name."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from agents import fast_decode, fast_model
from agents.advantages import AdvantageInput, get_advantage, grpo_group_ids, repeat_for_group
from agents.batch import RolloutBatch, build_batch, micro_batch_rows, micro_batches
from agents.call_errors import CallFailureMonitor, call_failure_metrics, first_error
from agents.config import TrainConfig, redacted
from agents.distributed import (
    Dist,
    PlainEngine,
    StepEngines,
    ZeroEngine,
    broadcast_module,
    idle_forward,
    lockstep,
    make_engine,
    per_rank,
    wrap_reference,
)
from agents.kl import AdaptiveKLController, FixedKLController, kl_estimate
from agents.losses import actor_objective, critic_objective, step_denominator
from agents.policy import (
    build_critic,
    build_reference,
    chunked_sequence_logprobs,
    compile_layers,
    sequence_logprobs,
    sequence_values,
)
from agents.relabel import relabelled, truncated_ratio
from agents.rollout import ForcedSchedule, episode_room, run_rollouts
from agents.routing_settings import RoutingSettings, save_routing_settings
from envs.atomic import write_text_atomic
from envs.conditioning import is_sample_set, spec_values
from envs.episode import EpisodeConfig, episode_prompts, with_conditions
from envs.vector import MultiRouteVectorEnv
from rewards import make_cost_normalizer
from rewards.compose import load_reward_fn

log = logging.getLogger("routerl")


class Means:
    """Running means of named statistics, each over the times it was added."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            value = float(value.detach() if torch.is_tensor(value) else value)
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def explained_variance(batch: RolloutBatch) -> dict[str, float]:
    """1 - Var(returns - values) / Var(returns) over action tokens (nan when returns do not vary);
    nothing without a critic."""
    if batch.values is None:
        return {}
    m = batch.action_mask.bool()
    y, v = batch.returns[m], batch.values[m]
    var_y = float(y.var()) if y.numel() > 1 else 0.0
    return {"critic/explained_variance": 1.0 - float((y - v).var()) / var_y if var_y > 0 else float("nan")}


# ---------------------------------------------------------------- data order

class PromptSampler:
    """Seeded epoch-wise shuffling of question indices; a global batch is cut into one contiguous
    shard per rank, so the same seed and cursor give the same questions after a resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.cursor = n, seed, 0

    def next_batch(self, size: int) -> list[int]:
        out = []
        for _ in range(size):
            epoch, pos = divmod(self.cursor, self.n)
            order = np.random.default_rng((self.seed, epoch)).permutation(self.n)
            out.append(int(order[pos]))
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])


# ---------------------------------------------------------------- episodes -> metrics

def episode_metrics(summaries: list[dict], prefix: str,
                    task_stats: Callable[[list[dict]], dict[str, float]] | None = None) -> dict[str, float]:
    """Mean reward, EM (outcome), format-error rate, raw cost, calls per episode and per candidate,
    failed calls (`call_failure_metrics`), and the task's own per-episode means (`task_stats`:
    summaries -> {name: mean}, e.g. RouteWorld's two-hop questions asked hop by hop)."""
    n = max(len(summaries), 1)
    out = {
        f"{prefix}/reward": sum(s["reward"]["total"] for s in summaries) / n,
        f"{prefix}/em": sum(s["reward"]["outcome"] for s in summaries) / n,
        f"{prefix}/format_error": sum(s["reward"]["format"] < 0 for s in summaries) / n,
        f"{prefix}/raw_cost": sum(s["raw_cost"] for s in summaries) / n,
        f"{prefix}/calls": sum(s["n_calls"] for s in summaries) / n,
        f"{prefix}/response_tokens": sum(s["response_tokens"] for s in summaries) / n,
    }
    for s in summaries:
        for c in s["calls"]:
            key = f"{prefix}/calls_{c['candidate']}"
            out[key] = out.get(key, 0.0) + 1.0 / n
    if task_stats is not None and summaries:
        out.update({f"{prefix}/{k}": v for k, v in task_stats(summaries).items()})
    return {**out, **call_failure_metrics(summaries, prefix)}


def sampled_alphas(episode: EpisodeConfig) -> list[float]:
    """The cost weights of a conditioned run drawn from a sample set of two or more (none for a fixed
    alpha, one pinned weight, or a range, whose draws are too many to log one by one)."""
    values = spec_values(episode.alpha) if is_sample_set(episode.alpha) else []
    return values if len(values) > 1 else []


def alpha_parts(summaries: list[dict], prefix: str, alphas: list[float]) -> dict[str, float]:
    """Per cost weight a: the share of episodes drawn at a, and the per-episode means of reward x [alpha
    = a] and raw cost x [alpha = a]. They average over ranks like any episode mean; `alpha_means`
    divides them after that average."""
    n, out = max(len(summaries), 1), {}
    for a in alphas:
        at = [s for s in summaries if s.get("alpha") is not None and math.isclose(s["alpha"], a, abs_tol=1e-9)]
        out[f"{prefix}/share@alpha={a:g}"] = len(at) / n
        out[f"{prefix}/reward_part@alpha={a:g}"] = sum(s["reward"]["total"] for s in at) / n
        out[f"{prefix}/raw_cost_part@alpha={a:g}"] = sum(s["raw_cost"] for s in at) / n
    return out


def alpha_means(metrics: dict[str, float], prefix: str, alphas: list[float]) -> dict[str, float]:
    """`{prefix}/reward@alpha=a` and `{prefix}/raw_cost@alpha=a`, the means over the episodes drawn at
    each weight, from `alpha_parts`' averages (weights never drawn get no key); the parts are dropped.
    A conditioned policy that spends alike at every weight has not learnt to read it."""
    out = {k: v for k, v in metrics.items() if "_part@alpha=" not in k and "/share@alpha=" not in k}
    for a in alphas:
        share = metrics.get(f"{prefix}/share@alpha={a:g}", 0.0)
        if share > 0:
            for name in ("reward", "raw_cost"):
                out[f"{prefix}/{name}@alpha={a:g}"] = metrics[f"{prefix}/{name}_part@alpha={a:g}"] / share
    return out


@dataclass
class Models:
    actor: torch.nn.Module  # what forward passes call: the module, or its DeepSpeed engine
    critic: torch.nn.Module | None
    ref: torch.nn.Module | None
    actor_engine: PlainEngine | ZeroEngine
    critic_engine: PlainEngine | ZeroEngine | None


class Trainer:
    """Holds the models, the env, the normalizer and the counters of one training run."""

    def __init__(self, cfg: TrainConfig, task, tokenizer, actor: torch.nn.Module, dist_: Dist,
                 run_dir: Path):
        self.cfg, self.task, self.tokenizer, self.dist, self.run_dir = cfg, task, tokenizer, dist_, run_dir
        alg = cfg.algorithm
        self.estimator = get_advantage(alg.advantage)
        self.adv_cfg = alg.advantage_options
        broadcast_module(actor, dist_)  # critic and reference start from rank 0's actor on every rank
        critic = build_critic(actor, cfg.model.critic_init) if self.estimator.needs_critic else None
        ref = build_reference(actor) if alg.kl.placement != "none" and alg.kl.coef > 0 else None
        o, ds = cfg.optim, cfg.deepspeed
        actor_engine = make_engine(actor, o.actor_lr, o.weight_decay, o.grad_clip, o.warmup_steps, dist_, ds)
        critic_engine = (make_engine(critic, o.critic_lr, o.weight_decay, o.grad_clip, o.warmup_steps, dist_,
                                     ds) if critic is not None else None)
        if cfg.model.compile_layers and getattr(actor_engine, "stage", 0) == 3:
            log.info("model.compile_layers is skipped under ZeRO-3: its per-layer gather hooks break the "
                     "compiled graph (1.5B update on an H200: no gain)")
        elif cfg.model.compile_layers:
            for m in (actor, critic, ref):
                if m is not None:
                    compile_layers(m)
        # the chunked LM head keeps no (tokens x vocab) logits for the backward pass, but it reads the head's
        # weight outside the module's forward, which DeepSpeed's hooks neither gather nor account for
        self.logprobs = partial(sequence_logprobs if ds else chunked_sequence_logprobs,
                                pack=cfg.rollout.pack_sequences)
        self.values = partial(sequence_values, pack=cfg.rollout.pack_sequences)
        self.m = Models(actor_engine.model, critic_engine.model if critic_engine else None,
                        wrap_reference(ref, dist_, ds) if ref is not None else None,
                        actor_engine, critic_engine)
        self.kl_ctl = (AdaptiveKLController(alg.kl.coef, alg.kl.target, alg.kl.horizon) if alg.kl.adaptive
                       else FixedKLController(alg.kl.coef))
        self.normalizer = make_cost_normalizer(cfg.cost.normalizer, **cfg.cost.options)
        self.reward_fn = load_reward_fn(cfg.reward_fn)
        self.env = MultiRouteVectorEnv(tokenizer, task.pool, cfg.episode, self.reward_fn)
        self.sampler = PromptSampler(len(task.train), cfg.seed)
        self.step = 0
        self.best_eval = -math.inf
        self.call_monitor = CallFailureMonitor(cfg.calls)
        self.pad_id = tokenizer.pad_token_id
        r = cfg.rollout
        self.forced = (ForcedSchedule.calls_then_answer(tokenizer, task.pool.names[0], r.forced_turns, r.forced_answer_at)
                       if r.forced_turns else None)
        self.fast: fast_decode.FastEngine | None = None  # built at the first phase that uses it

    def decode_engine(self, policy: torch.nn.Module) -> fast_decode.FastEngine | None:
        """The FastEngine for this phase, holding `policy`'s current weights (call it where the weights
        are gathered), or None for the simple path. Built once: CUDA graphs are captured per shape."""
        r = self.cfg.rollout
        if r.engine == "simple" or (r.engine == "auto" and not (self.dist.device.type == "cuda"
                                                                and fast_model.supports(policy))):
            return None
        if not fast_model.supports(policy):
            raise ValueError(f"rollout.engine=fast supports Qwen2 and Llama policies, not {policy.config.model_type!r}; "
                             "use rollout.engine=simple")
        if self.fast is not None:
            self.fast.load_weights(policy)
            return self.fast
        slots = r.engine_slots or r.n_prompts * r.n_per_prompt // self.dist.world_size
        self.fast = fast_decode.FastEngine(policy, self.tokenizer, slots, r.engine_max_len or self._longest_episode(),
                                           burst=r.engine_burst, attention=r.engine_attention,
                                           call_window_s=r.engine_call_window_s)
        log.info("rollouts use FastEngine: %d slots x %d cache positions, %s attention", slots, self.fast.max_len,
                 "triton" if self.fast.net.fused_attention else "matmul")
        return self.fast

    def _longest_episode(self) -> int:
        """A bound on an episode's tokens: the longest prompt of the train and test sets, the policy's
        token limit, and every allowed reply with its tags. An episode that still runs past it ends
        there (`FastEngine`), with a warning."""
        e = self.cfg.episode
        questions = [str(ex["question"]) for ex in list(self.task.train) + list(self.task.test)]
        alpha, cap = e.longest_conditions()  # stated in the prompt of a conditioned or capped episode
        prompt = max(map(len, episode_prompts(questions, self.tokenizer, self.task.pool, e,
                                              [alpha] * len(questions), [cap] * len(questions))))
        return prompt + episode_room(e)

    # ------------------------------------------------------------ one RL step

    def train_step(self) -> tuple[dict[str, float], list[dict]]:
        """One RL step: roll out, score the tokens, add KL and advantages, update; the methods below
        in that order."""
        t0 = time.perf_counter()
        batch, summaries, metrics = self.rollout()
        episodes = self._episode_means(summaries, "train", self.cfg.episode)
        n = self.cfg.rollout.n_prompts * self.cfg.rollout.n_per_prompt  # episodes of the step, all ranks
        self.call_monitor.observe(episodes["train/calls"] * n, episodes["train/failed_calls"] * n,
                                  first_error(summaries))
        batch = self.score_tokens(batch)
        m = batch.action_mask.bool() & (batch.source_rows < 0)[:, None]  # sampled rows: relabelled ones had no sampler
        gap = (batch.sampler_logprobs - batch.old_logprobs).abs()[m]
        if gap.numel():
            metrics["rollout/logprob_gap_mean"] = float(gap.mean())
            metrics["rollout/logprob_gap_p99"] = float(torch.quantile(gap.float(), 0.99))
        metrics.update(self.add_kl_and_advantages(batch))
        t1 = time.perf_counter()
        metrics.update(self.update(batch))
        update_s = time.perf_counter() - t1
        metrics.update(episodes)
        n_tokens = float(self.dist.all_reduce_sum(batch.attention_mask.sum().float()))
        if torch.cuda.is_available():
            metrics["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        metrics.update({"time/update_s": update_s, "time/step_s": time.perf_counter() - t0,
                        "perf/update_tokens_per_s": n_tokens / max(update_s, 1e-9), "train/step": self.step})
        self.step += 1
        return metrics, summaries

    def rollout(self) -> tuple[RolloutBatch, list[dict], dict]:
        """Sample this rank's shard of the step's questions, n_per_prompt times each, and score them."""
        cfg, d = self.cfg, self.dist
        n_prompts = cfg.rollout.n_prompts
        if n_prompts % d.world_size:
            raise ValueError(f"rollout.n_prompts={n_prompts} must be divisible by the world size {d.world_size}")
        global_idx = self.sampler.next_batch(n_prompts)
        per_rank = n_prompts // d.world_size
        mine = global_idx[d.rank * per_rank:(d.rank + 1) * per_rank]
        n = cfg.rollout.n_per_prompt
        # group ids are assigned to prompts BEFORE repeating, so a group is one question's n rollouts
        group_ids = (grpo_group_ids(per_rank, n) + d.rank * per_rank).tolist()
        # a sampled alpha or cap is drawn per prompt, then repeated with it: a group shares them
        prompts = with_conditions([self.task.train[i] for i in mine], cfg.episode, cfg.seed, self.step,
                                  index_offset=d.rank * per_rank, alpha=cfg.alpha_at(self.step))
        examples = repeat_for_group(prompts, n)
        t0 = time.perf_counter()
        with self.m.actor_engine.generation() as policy:  # ZeRO-3: weights gathered once for the phase
            sampler_logps, stats = run_rollouts(policy, self.env, examples, cfg.rollout.temperature,
                                                cfg.rollout.top_p, cfg.seed, self.step, self.pad_id,
                                                index_offset=d.rank * per_rank * n, forced=self.forced,
                                                engine=self.decode_engine(policy))
        rollout_s = time.perf_counter() - t0
        # the paper's normalizer sees every episode's cost of the batch (all ranks), then scores
        costs = d.all_gather_floats([e.raw_cost for e in self.env.episodes])
        self.normalizer.update(costs)
        scored = self.env.finish(self.normalizer)
        scores = [r.total for r, _ in scored]
        summaries = [s for _, s in scored]
        episodes, sources = list(self.env.episodes), [-1] * len(scores)
        alphas = self.relabel_alphas()
        if alphas:  # each episode restated at the step's other weights, a group per question and weight
            copies, src, slots = relabelled(episodes, alphas, self.tokenizer)
            scores += [c.score(self.normalizer, self.reward_fn).total for c in copies]
            group_ids += [group_ids[i] + k * n_prompts for i, k in zip(src, slots)]
            sampler_logps = list(sampler_logps) + [[0.0] * (len(c.inserted) - sum(c.inserted)) for c in copies]
            episodes, sources = episodes + copies, sources + src
        batch = build_batch(episodes, scores, group_ids, sampler_logps, self.pad_id, sources)
        timing = {"time/rollout_s": rollout_s, "perf/rollout_tokens_per_s": stats.generated_tokens / max(rollout_s, 1e-9)}
        if self.fast is not None:
            for k, v in self.fast.timings.items():  # seconds under time/, counts under perf/
                timing[f"{'time' if k.endswith('_s') else 'perf'}/rollout_{k}"] = v
        return batch, summaries, timing

    def relabel_alphas(self) -> list[float]:
        """The weights every episode is restated at (algorithm.relabel_alpha): all of episode.alpha's
        sample set, also while a curriculum stage draws only some of them (a stage draws trained
        weights only, so each episode gets the same number of copies)."""
        return sampled_alphas(self.cfg.episode) if self.cfg.algorithm.relabel_alpha else []

    @torch.no_grad()
    def score_tokens(self, batch: RolloutBatch) -> RolloutBatch:
        """old_logprobs (a training-mode forward of the current policy), ref_logprobs, values."""
        r = self.cfg.rollout
        T = r.temperature or 1.0
        shape = batch.input_ids.shape
        olds, refs, vals = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
        device = self.dist.device
        pieces = micro_batch_rows(batch.attention_mask.sum(1).tolist(), r.micro_batch_tokens, r.pack_sequences)
        for rows in lockstep(pieces, self.dist):
            if rows is None:  # another rank has more micro-batches: ZeRO-3 needs every rank's pass
                for model in (self.m.actor, self.m.ref, self.m.critic):
                    if model is not None:
                        idle_forward(model, device)
                continue
            mb = batch.select(rows).to(device)
            args = (mb.input_ids, mb.attention_mask, mb.position_ids)
            width = mb.input_ids.shape[1]
            self.m.actor.train()  # same mode as the update's forward
            olds[rows, :width] = self.logprobs(self.m.actor, *args, temperature=T)[0].float().cpu()
            if self.m.ref is not None:
                refs[rows, :width] = self.logprobs(self.m.ref, *args, temperature=T)[0].float().cpu()
            if self.m.critic is not None:
                vals[rows, :width] = self.values(self.m.critic, *args).float().cpu()
        batch.old_logprobs = olds
        batch.ref_logprobs = refs if self.m.ref is not None else None
        batch.values = vals if self.m.critic is not None else None
        return batch

    def add_kl_and_advantages(self, batch: RolloutBatch) -> dict[str, float]:
        """KL in the reward (per token, -beta * k) when configured, then the registered estimator."""
        kl_cfg, metrics = self.cfg.algorithm.kl, {}
        mask = batch.action_mask
        if batch.ref_logprobs is not None:
            kl = kl_estimate(batch.old_logprobs, batch.ref_logprobs, kl_cfg.estimator) * mask
            totals = self.dist.all_reduce_sum(torch.stack([kl.sum(), mask.sum()]).double())
            mean_kl = float(totals[0] / totals[1].clamp(min=1))
            metrics["kl/ref"] = mean_kl
            metrics["kl/beta"] = self.kl_ctl.value
            if kl_cfg.placement == "reward":
                batch.token_rewards = batch.token_rewards - self.kl_ctl.value * kl
            self.kl_ctl.update(mean_kl, len(batch))
        data = AdvantageInput(batch.token_rewards, mask, batch.values, batch.group_ids, self.dist.all_reduce_sum)
        batch.advantages, batch.returns = self.estimator.fn(data, self.adv_cfg)
        copies = batch.source_rows >= 0
        if copies.any():  # relabelled rows: sampled at another alpha, so weighted by the truncated ratio
            w = truncated_ratio(batch.old_logprobs, mask, batch.source_rows)
            batch.advantages = batch.advantages * w[:, None]
            metrics["relabel/ratio_mean"] = float(w[copies].mean())
        return metrics

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """`ppo_epochs` passes over shuffled minibatches; one optimizer step per minibatch."""
        alg = self.cfg.algorithm
        size = per_rank("algorithm.minibatch_size", alg.minibatch_size, self.dist.world_size)
        size *= len(batch) // int((batch.source_rows < 0).sum())  # relabelled copies: as many optimizer steps
        train_actor = self.step >= alg.critic_warmup_steps  # the critic alone during its warm-up
        engines = StepEngines({"actor": self.m.actor_engine if train_actor else None,
                               "critic": self.m.critic_engine}, self.dist)
        stats = Means()
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        for _ in range(alg.ppo_epochs):
            order = torch.randperm(len(batch), generator=g)
            for start in range(0, len(batch), size):
                self.optimizer_step(batch.select(order[start:start + size]), engines, stats)
        return {**stats.means(), **explained_variance(batch)}

    def optimizer_step(self, minibatch: RolloutBatch, engines: StepEngines, stats: Means) -> None:
        """A backward pass per micro-batch of `minibatch`, then one step of every trained engine."""
        cfg, alg = self.cfg, self.cfg.algorithm
        pieces = micro_batches(minibatch, cfg.rollout.micro_batch_tokens, cfg.rollout.pack_sequences)
        shared = {"mode": alg.loss_agg,  # one count over the whole step: micro-batches and ranks
                  "denominator": step_denominator([p.action_mask for p in pieces], alg.loss_agg,
                                                  self.dist.all_reduce_sum)}
        for p in engines.passes(pieces):
            p = p.to(self.dist.device)
            args = (p.input_ids, p.attention_mask, p.position_ids)
            if engines.trains("actor"):
                logp, entropy = self.logprobs(self.m.actor, *args, temperature=cfg.rollout.temperature or 1.0,
                                              with_entropy=True)
                ref = p.ref_logprobs if alg.kl.placement == "loss" else None
                loss, actor_stats = actor_objective(
                    logp, entropy, p.old_logprobs, p.advantages, p.action_mask, ref, **shared,
                    clip_eps=alg.clip_eps, dual_clip=alg.dual_clip, entropy_coef=alg.entropy_coef,
                    kl_coef=self.kl_ctl.value, kl_estimator=alg.kl.estimator)
                engines.backward("actor", loss)
                stats.add(actor_stats)
            if engines.trains("critic"):
                values = self.values(self.m.critic, *args)
                loss, critic_stats = critic_objective(values, p.values, p.returns, p.action_mask, **shared,
                                                      value_clip=alg.value_clip, vf_coef=alg.vf_coef)
                engines.backward("critic", loss)
                stats.add(critic_stats)
        stats.add(engines.step())

    def _episode_means(self, summaries: list[dict], prefix: str, episode: EpisodeConfig) -> dict[str, float]:
        """`episode_metrics` over every rank's episodes, with each sampled cost weight's reward and raw cost."""
        alphas = sampled_alphas(episode)
        local_means = {**episode_metrics(summaries, prefix, self.task.episode_stats),
                       **alpha_parts(summaries, prefix, alphas)}
        return alpha_means(self._reduce(local_means, len(summaries)), prefix, alphas)

    def _reduce(self, metrics: dict[str, float], n: int) -> dict[str, float]:
        """Episode means over all ranks: each rank's means weighted by its `n` episodes (a key a rank
        lacks, e.g. calls to a candidate it never called, counts as 0 there)."""
        parts = self.dist.all_gather((n, metrics))
        total = max(sum(k for k, _ in parts), 1)
        keys = sorted({key for _, m in parts for key in m})
        return {key: sum(k * m.get(key, 0.0) for k, m in parts) / total for key in keys}

    # ------------------------------------------------------------ evaluation

    def evaluate(self, examples: list, prefix: str = "eval", pool=None,
                 episode: EpisodeConfig | None = None) -> tuple[dict[str, float], list[dict]]:
        """Greedy episodes on held-out questions, scored with the normalizer frozen; `pool` replaces the
        task's candidates (e.g. ones that only ever reply "unknown"), `episode` the run's episode
        settings (e.g. pinned at one alpha). A sampled alpha or cap is drawn per question from a stream
        that is the same at every evaluation, so checkpoints compare on the same draws."""
        d, episode = self.dist, episode or self.cfg.episode
        mine = with_conditions(examples, episode, self.cfg.seed, "eval")[d.rank::d.world_size]
        env = MultiRouteVectorEnv(self.tokenizer, pool or self.task.pool, episode, self.reward_fn)
        summaries = []
        chunk = self.cfg.rollout.n_prompts
        with self.m.actor_engine.generation() as policy:
            engine = self.decode_engine(policy)
            for start in range(0, len(mine), chunk):
                run_rollouts(policy, env, mine[start:start + chunk], 0.0, 1.0, self.cfg.seed, -1, self.pad_id,
                             forced=self.forced, engine=engine)
                summaries += [s for _, s in env.finish(self.normalizer)]
        return self._episode_means(summaries, prefix, episode), summaries

    # ------------------------------------------------------------ checkpoints

    def save(self, name: str | None = None) -> Path:
        """Write a checkpoint to a temp dir, then rename: a crash mid-write leaves the old ones intact.

        `actor/` and `critic/` hold the engines (weights and optimizer state; DeepSpeed checkpoints,
        written by every rank, under DeepSpeed); `policy/` is the consolidated policy that
        transformers loads directly, with `routing.json` (agents.routing_settings) beside it. The frozen
        reference is rebuilt from the same starting weights on resume, so it is not saved. All ranks
        call this and agree on the temp path.
        """
        d = self.dist
        ckpt_root = self.run_dir / "checkpoints"
        final = ckpt_root / (name or f"step_{self.step:06d}")
        tmp = ckpt_root / f".tmp_{final.name}"
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        d.barrier()
        self.m.actor_engine.save(tmp / "actor")
        if self.m.critic_engine is not None:
            self.m.critic_engine.save(tmp / "critic")
        weights = self.m.actor_engine.full_state_dict()  # a collective under ZeRO-3
        if d.is_main:
            policy = self.m.actor_engine.module
            policy.save_pretrained(tmp / "policy", state_dict=weights, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "policy")
            save_routing_settings(tmp / "policy", RoutingSettings.from_episode(self.cfg.episode, self.task.pool.specs))
            state = {
                "step": self.step, "best_eval": self.best_eval,
                "kl_ctl": self.kl_ctl.state_dict(),
                "normalizer": self.normalizer.state_dict(),
                "sampler": self.sampler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": _plain_numpy_state(),
                        "python": _plain_python_state()},
            }
            torch.save(state, tmp / "trainer_state.pt")
            with open(tmp / "config.yaml", "w") as f:
                yaml.safe_dump(redacted(self.cfg), f, sort_keys=False)
        d.barrier()  # every rank's shards are on disk before the rename
        if d.is_main:
            (tmp / "COMPLETE").write_text(str(self.step))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune(ckpt_root)
        d.barrier()
        return final

    def _prune(self, root: Path) -> None:
        steps = sorted(p for p in root.glob("step_*") if (p / "COMPLETE").exists())
        for old in steps[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path) -> None:
        """Restore engines (weights, optimizer, schedule), KL controller, normalizer, sampler cursor, RNG."""
        state = torch.load(path / "trainer_state.pt", weights_only=True)
        self.m.actor_engine.load(path / "actor")
        if self.m.critic_engine is not None:
            self.m.critic_engine.load(path / "critic")
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.normalizer.load_state_dict(state["normalizer"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        kind, keys, pos, has_gauss, gauss = state["rng"]["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state["rng"]["python"]
        random.setstate((version, tuple(internal), gauss_next))
        self.step, self.best_eval = state["step"], state["best_eval"]


def _plain_numpy_state() -> list:
    """numpy's global RNG state as plain values, which `torch.load(weights_only=True)` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _plain_python_state() -> list:
    """Python's global RNG state as plain values (its tuple of ints as a list)."""
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete `step_*` checkpoints, newest first (a half-written temp dir is never listed)."""
    return sorted((p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").exists()), reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete `step_*` checkpoint."""
    steps = complete_checkpoints(run_dir)
    return steps[0] if steps else None


class MetricsLogger:
    """JSONL (always), TensorBoard (when installed), W&B (when asked for and installed); rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, use_wandb: bool = False, config: dict | None = None,
                 resume_step: int | None = None):
        """`resume_step`: a resumed run drops the lines logged after that step (they are logged again)."""
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.samples = run_dir / "samples.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        if resume_step is not None:
            for path in (self.path, self.samples):
                _keep_lines_up_to(path, resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step is not None else None)
        except ImportError:
            log.info("tensorboard is not installed; logging to metrics.jsonl only")
        if use_wandb:
            try:
                import wandb
                self.wandb = wandb.init(project="routerl", dir=str(run_dir), config=config)
            except ImportError:
                log.warning("wandb=true but wandb is not installed; skipping W&B logging")

    def log(self, step: int, metrics: dict[str, Any], samples: list[dict] = ()) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if samples:
            with open(self.samples, "a") as f:
                for s in samples:
                    f.write(json.dumps({"step": step, **s}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _keep_lines_up_to(path: Path, step: int) -> None:
    """Rewrite a JSONL log without the lines of steps after `step` and without an ended run's
    `final` summary line (temp file, then rename)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    records = [(line, json.loads(line)) for line in lines if line.strip()]
    keep = [line for line, r in records if r.get("step", 0) <= step and not r.get("final")]
    if len(keep) < len(lines):
        write_text_atomic(path, "".join(keep))
