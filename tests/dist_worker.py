"""The program tests/test_distributed.py launches under torchrun: one PPO update on a saved global
RolloutBatch (each rank takes its contiguous shard), or a call of train.main.

    torchrun ... tests/dist_worker.py update OUT BATCH [dotted.key=value ...]
    torchrun ... tests/dist_worker.py skip OUT BATCH [dotted.key=value ...]
    torchrun ... tests/dist_worker.py train [train.py arguments ...]

`update` writes (rank 0) the step's loss at the old policy (policy + value terms), how far the
weights moved, every action token's advantage, the
gradient norms and the updated actor and critic weights. With one process and no BATCH file yet it
first samples the batch and saves it. `skip` first runs an update whose loss is NaN on the last rank
only, records whether any weight moved, then runs the clean update and writes as `update` does.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from agents.batch import RolloutBatch  # noqa: E402
from agents.config import load_config  # noqa: E402
from agents.distributed import init_distributed  # noqa: E402
from agents.losses import agg_loss, policy_loss, step_denominator, value_loss  # noqa: E402
from agents.policy import build_actor  # noqa: E402
from agents.trainer import Trainer  # noqa: E402
from envs.tasks import make_task  # noqa: E402


def save_batch(batch: RolloutBatch, path: Path) -> None:
    torch.save(dataclasses.asdict(batch), path)


def load_batch(path: Path) -> RolloutBatch:
    return RolloutBatch(**torch.load(path, weights_only=True))


def shard(batch: RolloutBatch, rank: int, world_size: int) -> RolloutBatch:
    """Rank r's contiguous rows: whole GRPO groups, as Trainer.rollout assigns them."""
    per_rank = len(batch) // world_size
    return batch.select(torch.arange(rank * per_rank, (rank + 1) * per_rank))


def prepare(trainer: Trainer, batch: RolloutBatch) -> RolloutBatch:
    batch = trainer.score_tokens(batch)
    trainer.add_kl_and_advantages(batch)
    return batch


def update(out: Path, batch_path: Path, overrides: list[str], nan_first: bool) -> None:
    cfg = load_config(ROOT / "configs" / "routeworld_tiny.yaml", overrides)
    d = init_distributed(cfg.device, use_deepspeed=cfg.deepspeed is not None)
    torch.manual_seed(cfg.seed)
    task = make_task(cfg)
    tok = task.tokenizer
    actor = build_actor(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id, d.device)
    trainer = Trainer(cfg, task, tok, actor, d, Path(cfg.run_dir))
    if not batch_path.exists():
        if d.world_size != 1:
            raise FileNotFoundError(f"{batch_path}: the batch is sampled by a 1-process run first")
        save_batch(trainer.rollout()[0], batch_path)
    result: dict = {}
    mine = shard(load_batch(batch_path), d.rank, d.world_size)
    if nan_first:
        before = trainer.m.actor_engine.full_state_dict()
        bad = prepare(trainer, mine)
        if d.rank == d.world_size - 1:
            bad.advantages = bad.advantages * float("nan")
        skipped = trainer.update(bad).get("train/skipped_updates", 0.0)
        after = trainer.m.actor_engine.full_state_dict()
        if d.is_main:
            result["skipped"] = skipped
            result["moved"] = any(not torch.equal(before[k], after[k]) for k in before)
    batch = prepare(trainer, mine)
    denom = step_denominator([batch.action_mask], cfg.algorithm.loss_agg, d.all_reduce_sum)
    mode, alg = cfg.algorithm.loss_agg, cfg.algorithm
    mask = batch.action_mask
    pg = policy_loss(batch.old_logprobs, batch.old_logprobs, batch.advantages)[0]
    loss = agg_loss(pg, mask, mode, denom)  # whitened advantages make this term 0; the value term is not
    vl = value_loss(batch.values, batch.values, batch.returns, alg.value_clip)
    loss = loss + alg.vf_coef * agg_loss(vl, mask, mode, denom)
    start = trainer.m.actor_engine.full_state_dict()
    result["loss"] = float(d.all_reduce_sum(loss.detach().double().reshape(1)))
    result["advantages"] = d.all_gather_floats(batch.advantages[batch.action_mask.bool()].tolist())
    metrics = trainer.update(batch)
    result["grad_norm"] = metrics["actor/grad_norm"]
    result["critic_grad_norm"] = metrics.get("critic/grad_norm")
    result["actor"] = trainer.m.actor_engine.full_state_dict()
    result["critic"] = trainer.m.critic_engine.full_state_dict() if trainer.m.critic_engine else None
    if d.is_main:
        result["change"] = max(float((result["actor"][k] - start[k]).abs().max()) for k in start)
        torch.save(result, out)
    d.barrier()


def main(argv: list[str]) -> None:
    mode, *rest = argv
    if mode in ("update", "skip"):
        out, batch_path, *overrides = rest
        update(Path(out), Path(batch_path), overrides, nan_first=mode == "skip")
    elif mode == "train":
        train.main(rest)
    else:
        raise ValueError(f"mode={mode!r}; expected update, skip or train")


if __name__ == "__main__":
    main(sys.argv[1:])
