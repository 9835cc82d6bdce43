"""Train a router: python train.py --config configs/X.yaml [dotted.key=value ...] [--resume].

With no config it runs the tiny RouteWorld job on a CPU: supervised warm start on scripted
trajectories, then PPO, then a table of held-out test figures for the SFT start, the trained policy
(the checkpoint chosen on validation questions), every fixed candidate, the oracle plan and the best
single-round router, and curves.png in the run directory. Launch with torchrun for many GPUs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from agents.call_errors import CallFailureAbort, CallFailureMonitor, first_error
from agents.config import TrainConfig, load_config, redacted
from agents.distributed import init_distributed, per_rank
from agents.pad_token import ensure_pad_token, generation_eos
from agents.policy import build_actor
from agents.relabel import check_cues
from agents.sft import play_scripted, replay_turns, sft_train, trajectories_from_jsonl
from agents.trainer import MetricsLogger, Trainer, complete_checkpoints, latest_checkpoint
from envs.atomic import write_atomic, write_text_atomic
from envs.candidates.pool import CandidatePool
from envs.candidates.simulated import SimulatedBackend
from envs.conditioning import spec_values
from envs.episode import EpisodeConfig, episode_prompts, with_conditions
from envs.prompts import build_prompt
from envs.tasks import make_task, seeded_rng
from envs.vector import MultiRouteVectorEnv
from rewards.table import markdown_table

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "routeworld_tiny.yaml"
log = logging.getLogger("routerl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: the tiny RouteWorld job)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--resume-anyway", action="store_true",
                   help="resume even though the seed, alpha, algorithm, task or cost settings changed")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. episode.alpha=0.8")
    return p.parse_args(argv)


def run_sft(cfg: TrainConfig, task, tokenizer, actor, dist_) -> None:
    """Warm start: scripted (or recorded) trajectories played through the env, then supervised fit."""
    env = MultiRouteVectorEnv(tokenizer, task.pool, cfg.episode)
    if cfg.sft.source == "scripted":
        if task.script is None:
            raise ValueError(f"sft.source=scripted but task {task.name!r} has no scripted agent; "
                             "give sft.source=<trajectories.jsonl>")
        rng = seeded_rng(cfg.seed, 1)
        examples = [task.train[int(i)] for i in rng.integers(len(task.train), size=cfg.sft.n_examples)]
        script = task.script
    else:
        examples, script, rng = trajectories_from_jsonl(cfg.sft.source), replay_turns, seeded_rng(cfg.seed, 1)
    examples = with_conditions(examples, cfg.episode, cfg.seed, "sft")[dist_.rank::dist_.world_size]
    episodes, monitor = [], CallFailureMonitor(cfg.calls)
    for start in range(0, len(examples), 256):
        played = play_scripted(env, examples[start:start + 256], script, rng)
        calls = [c.as_dict() for e in played for c in e.calls]
        monitor.observe(len(calls), sum(bool(c["error"]) for c in calls), first_error([{"calls": calls}]),
                        "warm-start rounds")  # else it would learn to copy error replies
        episodes += played
    t0 = time.perf_counter()
    losses = sft_train(actor, episodes, tokenizer.pad_token_id, cfg.sft.epochs, cfg.sft.lr, cfg.sft.batch_size,
                       cfg.seed, cfg.rollout.micro_batch_tokens)
    log.info("SFT: %d trajectories, %d steps, loss %.3f -> %.3f in %.0fs", len(episodes), len(losses),
             losses[0], losses[-1], time.perf_counter() - t0)


def report_points(cfg: TrainConfig) -> list[tuple[str, EpisodeConfig, float]]:
    """(row-name suffix, episode settings, alpha) of each point the final table reports: the run's own
    alpha, or for a conditioned policy each of `report_alphas`, stated in the prompt."""
    if not cfg.episode.conditioned:
        return [("", cfg.episode, cfg.episode.alpha)]
    return [(f" (alpha {a:g})", cfg.episode.pinned(a), float(a)) for a in cfg.report_alphas]


def reference_rows(cfg: TrainConfig, task, tokenizer, normalizer, episode: EpisodeConfig,
                   alpha: float) -> dict[str, dict]:
    """The task's scripted reference routers (the oracle plan at `alpha`), played in the env on the
    test questions, so they are measured like the policy: the same `episode_metrics` and the trained
    normalizer."""
    from agents.trainer import episode_metrics
    rows = {}
    for name, script in task.references(alpha, normalizer).items():
        env = MultiRouteVectorEnv(tokenizer, task.pool, episode)
        play_scripted(env, with_conditions(task.test, episode, cfg.seed, "eval"), script, seeded_rng(cfg.seed, 2))
        rows[name] = episode_metrics([s for _, s in env.finish(normalizer)], "eval", task.episode_stats)
    return rows


def baseline_rows(cfg: TrainConfig, run_dir: Path, task, episode: EpisodeConfig,
                  out: str = "single_round") -> dict[str, dict]:
    """evaluate.py's routers in the same env on the same test questions: `fixed:<name>` for every
    candidate (the whole question to one candidate), and knn, mlp and mf trained on the training
    split's per-candidate outcomes, whose row is the best point of their lambda grids by reward under
    `episode`'s alpha. Their full table is in `run_dir/<out>/`."""
    import evaluate
    from agents.routers import RouterOptions
    ecfg = evaluate.EvalConfig(task="routeworld", world=cfg.task.world, world_preset=cfg.task.world_preset,
                               max_questions=cfg.task.n_test, episode=episode,
                               cost_normalizer=cfg.cost.normalizer, cost_options=cfg.cost.options,
                               routers=RouterOptions(features="tfidf"), outcome_matrix=False, seed=cfg.seed)
    fixed = [f"fixed:{name}" for name in task.pool.names]
    result = evaluate.evaluate_routers(ecfg, [*fixed, "knn", "mlp", "mf"], run_dir / out)

    def row(r: dict) -> dict:
        o = r["metrics"]["by_dataset"]["overall"]
        return {"eval/em": o["em"], "eval/format_error": o["format_error_rate"], "eval/raw_cost": o["raw_cost"],
                "eval/calls": o["calls_per_question"], "eval/call_error_rate": r["metrics"]["call_error_rate"],
                "eval/reward": r["metrics"]["reward"]}
    rows = {f"fixed: {r['name'].split(':', 1)[1]}": row(r) for r in result["rows"] if r["name"] in fixed}
    best = max((r for r in result["rows"] if r["name"] not in fixed), key=lambda r: r["metrics"]["reward"])
    return rows | {f"best single-round: {best['name']}": row(best)}


def check_prompt_lengths(cfg: TrainConfig, task, tokenizer) -> None:
    """Refuse, before any model loads, a question whose episode cannot fit the model's context: its
    prompt, `max_response_tokens` and `max_turns` replies of `max_info_tokens` (plus their tags).
    A prompt's length is bounded by a one-word question's prompt plus the question's own tokens."""
    if cfg.model.name_or_path:
        from transformers import AutoConfig
        context = AutoConfig.from_pretrained(cfg.model.name_or_path).max_position_embeddings
    else:
        context = cfg.model.init.get("max_position_embeddings", 2048)
    e = cfg.episode
    budget = context - e.max_response_tokens - e.max_turns * (e.max_info_tokens + 8)
    alpha, cap = e.longest_conditions()  # stated in a conditioned or capped prompt
    base = len(tokenizer.encode(build_prompt("?", task.pool.specs, e.prompt_template, e.max_turns, alpha, cap),
                                add_special_tokens=False))
    for split, rows in (("train", task.train), ("val", task.val), ("test", task.test)):
        lengths = [len(ids) for ids in tokenizer([q["question"] for q in rows], add_special_tokens=False)["input_ids"]]
        for q, n in zip(rows, lengths):
            if base + n + 2 > budget:
                raise ValueError(
                    f"{split} question {q.get('id', q['question'][:60])!r} has {n} tokens: with its prompt "
                    f"({base}), max_response_tokens={e.max_response_tokens} and {e.max_turns} replies of "
                    f"max_info_tokens={e.max_info_tokens} its episode exceeds the model's context of {context} "
                    "tokens; shorten or drop the question, or lower those limits")


# Settings whose change makes a resumed run a different experiment.
RESUME_KEYS = ("seed", "episode.alpha", "episode.max_cost", "algorithm.advantage", "task", "cost")


def check_resume_config(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume when the newest checkpoint was trained with other `RESUME_KEYS` values."""
    newest = latest_checkpoint(run_dir)
    if newest is None or not (newest / "config.yaml").exists():
        return
    saved, now = yaml.safe_load((newest / "config.yaml").read_text()), redacted(cfg)

    def get(d, key):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d
    changed = [f"{k}: {get(saved, k)!r} -> {get(now, k)!r}" for k in RESUME_KEYS if get(saved, k) != get(now, k)]
    if changed:
        raise ValueError(f"--resume from {newest} with changed settings ({'; '.join(changed)}); use the "
                         "checkpoint's settings, another run_dir, or --resume-anyway")


def load_newest_intact(trainer: Trainer, run_dir: Path) -> Path:
    """Load the newest complete checkpoint that reads; an unreadable one is reported with its path
    and the one before it is tried."""
    for path in complete_checkpoints(run_dir):
        try:
            trainer.load(path)
        except Exception as e:  # a corrupt file: pickle, zip or safetensors errors alike
            log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", path, type(e).__name__, e)
            continue
        log.info("resumed from %s at step %d", path, trainer.step)
        return path
    raise RuntimeError(f"--resume: no checkpoint under {run_dir / 'checkpoints'} could be read")


def unknowing_pool(pool: CandidatePool) -> CandidatePool:
    """The same candidates (names, prices, prompt block), each replying "unknown" to everything: the
    control that shows the policy cannot answer held-out questions from what training taught it."""
    return CandidatePool(pool.specs, SimulatedBackend({s.name: (lambda request: "unknown") for s in pool.specs}))


def select_checkpoint(trainer: Trainer, task) -> dict[str, float]:
    """Greedy episodes on the validation questions; the best reward so far is saved as `best`."""
    metrics, _ = trainer.evaluate(task.val, "val")
    if metrics["val/reward"] > trainer.best_eval:
        trainer.best_eval = metrics["val/reward"]
        trainer.save("best")
    return metrics


def write_report(run_dir: Path, rows: dict[str, dict], metrics_path: Path) -> str:
    """The final table (Markdown) and curves.png (reward, EM and cost over training steps)."""
    cols = [("eval/em", "EM"), ("eval/format_error", "format err"), ("eval/raw_cost", "raw cost"),
            ("eval/calls", "calls/q"), ("eval/call_error_rate", "call err"), ("eval/reward", "reward"),
            ("eval/two_hop_split_share", "2-hop split")]
    for m in rows.values():  # RouteWorld: the share of two-hop questions asked hop by hop
        if m.get("eval/two_hop"):
            m["eval/two_hop_split_share"] = m["eval/hop_split"] / m["eval/two_hop"]
    table = markdown_table(["router"] + [c for _, c in cols],
                           [[name] + [f"{m[k]:.3f}" if k in m else "-" for k, _ in cols] for name, m in rows.items()])
    write_text_atomic(run_dir / "results.md", table + "\n")
    write_text_atomic(run_dir / "results.json", json.dumps(rows, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key, title in zip(axes, ("reward", "em", "raw_cost"), ("reward", "EM", "raw cost (micro-$)")):
        for split, style in (("train", "-"), ("val", "o-")):
            pts = [(r["step"], r[f"{split}/{key}"]) for r in records if f"{split}/{key}" in r]
            if pts:
                ax.plot(*zip(*pts), style, label=split)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    write_atomic(run_dir / "curves.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return table


def main(argv=None) -> dict:
    # read when CUDA starts: memory freed by one micro-batch's shapes is reused by the next's (faster:
    # bench/README.md, "Update runs"); a user's own setting wins
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)  # every key validated before any model loads
    dist_ = init_distributed(cfg.device, use_deepspeed=cfg.deepspeed is not None)
    per_rank("rollout.n_prompts", cfg.rollout.n_prompts, dist_.world_size)  # global sizes: fail before loading
    per_rank("algorithm.minibatch_size", cfg.algorithm.minibatch_size, dist_.world_size)
    logging.basicConfig(level=logging.INFO if dist_.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    run_dir = Path(cfg.run_dir)
    if args.resume and not args.resume_anyway:
        check_resume_config(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist_.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(redacted(cfg), sort_keys=False))
    torch.manual_seed(cfg.seed)  # model initialisation only; sampling streams are keyed per episode

    task = make_task(cfg)
    try:
        return train(cfg, task, dist_, run_dir, args.resume or args.resume_anyway)
    finally:
        task.pool.close()  # on any error too: a pool left open would keep the process alive


def train(cfg: TrainConfig, task, dist_, run_dir: Path, resume: bool) -> dict:
    """Warm start, RL and the final table; see the module docstring."""
    if task.tokenizer is not None:
        tokenizer = task.tokenizer
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
        ensure_pad_token(tokenizer, generation_eos(cfg.model.name_or_path))  # agents/pad_token.py: the rule
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError("the tokenizer needs a pad token distinct from EOS (set one and save the tokenizer)")

    check_prompt_lengths(cfg, task, tokenizer)
    if cfg.algorithm.relabel_alpha:
        alphas = spec_values(cfg.episode.alpha)
        check_cues(episode_prompts([task.train[0]["question"]] * len(alphas), tokenizer, task.pool, cfg.episode, alphas),
                   alphas, tokenizer)
    resume_from = latest_checkpoint(run_dir) if resume else None
    sft_dir = run_dir / "sft_policy"
    if resume_from is not None and sft_dir.exists():
        cfg.model.name_or_path = str(sft_dir)  # ref and critic trunk start from the SFT weights
    actor = build_actor(cfg.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, dist_.device)

    rows: dict[str, dict] = {}
    sft_eval_path = run_dir / "sft_eval.json"
    if cfg.sft.enabled and resume_from is None:
        run_sft(cfg, task, tokenizer, actor, dist_)
        if dist_.is_main:
            actor.save_pretrained(sft_dir)
            tokenizer.save_pretrained(sft_dir)
    trainer = Trainer(cfg, task, tokenizer, actor, dist_, run_dir)
    if resume_from is not None:
        load_newest_intact(trainer, run_dir)
    logger = MetricsLogger(run_dir, dist_.is_main, cfg.wandb, redacted(cfg),
                           resume_step=trainer.step if resume_from is not None else None)
    start, points = "SFT start" if cfg.sft.enabled else "start", report_points(cfg)
    if sft_eval_path.exists():
        saved = json.loads(sft_eval_path.read_text())
        rows.update({start: saved} if "eval/reward" in saved else saved)  # a run before issue 26 saved one row
    else:
        start_rows = {start + suffix: trainer.evaluate(task.test, episode=ep)[0] for suffix, ep, _ in points}
        rows.update(start_rows)
        if dist_.is_main:
            write_text_atomic(sft_eval_path, json.dumps(start_rows))

    bar = tqdm(total=cfg.total_steps, initial=trainer.step, disable=not dist_.is_main, desc="PPO", dynamic_ncols=True)
    while trainer.step < cfg.total_steps:
        metrics, summaries = trainer.train_step()
        step = trainer.step
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_steps:
            metrics.update(select_checkpoint(trainer, task))
        if step % cfg.log_every == 0:
            logger.log(step, metrics, summaries[:cfg.n_samples_logged])
        if cfg.save_every and step % cfg.save_every == 0:
            trainer.save()
        bar.set_postfix(reward=f"{metrics['train/reward']:.3f}", em=f"{metrics['train/em']:.2f}",
                        cost=f"{metrics['train/raw_cost']:.1f}")
        bar.update(1)
    bar.close()

    last_step, (val, _) = trainer.step, trainer.evaluate(task.val, "val")
    if cfg.save_final:
        trainer.save()
    best = run_dir / "checkpoints" / "best"  # always the checkpoint whose test figures are reported
    if val["val/reward"] < trainer.best_eval and (best / "COMPLETE").exists():
        trainer.load(best)  # an earlier checkpoint did better on the validation questions
    elif cfg.save_final or best.exists():
        trainer.best_eval = val["val/reward"]
        trainer.save("best")
    chosen_step = trainer.step
    for suffix, ep, _ in points:  # test figures, once, for the chosen checkpoint
        rows["trained policy" + suffix], _ = trainer.evaluate(task.test, episode=ep)
    train_sample = [task.train[int(i)] for i in seeded_rng(cfg.seed, 3).permutation(len(task.train))[:144]]
    rows["trained policy on 144 train questions"], _ = trainer.evaluate(train_sample)
    silent = unknowing_pool(task.pool)
    try:
        rows["trained policy, every reply 'unknown'"], _ = trainer.evaluate(task.test, pool=silent)
    finally:
        silent.close()
    logger.log(last_step, {**val, "final": True, "chosen_step": chosen_step,
                           **{k.replace("eval/", "test/"): v for k, v in rows["trained policy" + points[0][0]].items()}})
    if dist_.is_main:
        for i, (suffix, ep, alpha) in enumerate(points):
            if task.name == "routeworld":
                out = "single_round" if i == 0 else f"single_round_a{alpha:g}"
                rows.update({k + suffix: v for k, v in baseline_rows(cfg, run_dir, task, ep, out).items()})
            if task.references is not None:
                rows.update({k + suffix: v for k, v in reference_rows(cfg, task, tokenizer, trainer.normalizer,
                                                                      ep, alpha).items()})
        rows = {k: rows[k] for suffix, _, _ in points for k in rows if k.endswith(suffix)} | rows  # by alpha
        table = write_report(run_dir, rows, logger.path)
        print(f"\nHeld-out results ({len(task.test)} test questions, alpha={cfg.episode.alpha}, "
              f"checkpoint of step {chosen_step} chosen on {len(task.val)} validation questions):\n{table}\n"
              f"curves: {run_dir / 'curves.png'}")
    logger.close()
    return rows


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, CallFailureAbort) as e:  # bad config, data or candidates: one line
        sys.exit(f"{Path(__file__).name}: {e}")
