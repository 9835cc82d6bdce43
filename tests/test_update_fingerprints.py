"""The post-update weights of one training step, for every estimator x loss aggregation x KL placement,
with padded and with packed micro-batches, match fingerprints stored in `update_fingerprints.json`.

A change that should leave the update alone (a refactor) must leave these numbers alone. The stored
values came from the code before the architecture step of issue 24; they were bitwise equal there on
the machine that wrote them. Across CPUs, float sums may differ in the last bits, so the comparison
allows 1e-4 relative (packed and padded micro-batches differ by up to 1e-5). Regenerate (only for an intended change of the update, and say so in the
commit): `python tests/test_update_fingerprints.py`.
"""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import TINY_RUN  # noqa: E402

STORE = Path(__file__).resolve().parent / "update_fingerprints.json"
ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
PLACEMENTS = ("reward", "loss")
OUTCOME_ONLY = ("grpo", "rloo")  # they read each sequence's summed reward: KL goes in the loss
CASES = [(e, a, k, p) for e in ESTIMATORS for a in AGGS for k in PLACEMENTS for p in ("false", "true")
         if not (e in OUTCOME_ONLY and k == "reward")]
BASE = [*TINY_RUN, "device=cpu", "sft.enabled=false", "episode.max_response_tokens=48", "rollout.n_prompts=4",
        "algorithm.minibatch_size=4", "algorithm.ppo_epochs=2", "rollout.micro_batch_tokens=300",
        "algorithm.entropy_coef=0.01", "algorithm.kl.coef=0.05"]


def case_name(case) -> str:
    return "/".join(case)


def overrides(estimator: str, agg: str, placement: str, pack: str) -> list[str]:
    group = ["rollout.n_per_prompt=2", "rollout.n_prompts=2"] if estimator in OUTCOME_ONLY else []
    kl = ["algorithm.kl.estimator=k3"] if placement == "loss" else []
    return [*BASE, *group, *kl, f"algorithm.advantage={estimator}", f"algorithm.loss_agg={agg}",
            f"algorithm.kl.placement={placement}", f"rollout.pack_sequences={pack}"]


_ROLLOUTS: dict = {}


def fingerprint(case, run_dir: Path) -> list[float]:
    """The update's loss statistics and gradient norms (Adam's step hides a loss's scale; these do
    not), then three numbers per trained model: the sum, the sum of squares and a fixed random
    projection of all its weights, in float64."""
    from agents.config import load_config
    from agents.distributed import Dist
    from agents.policy import build_actor
    from agents.trainer import Trainer
    from envs.tasks import make_task
    cfg = load_config("configs/routeworld_tiny.yaml", [f"run_dir={run_dir}", *overrides(*case)])
    task = make_task(cfg)
    tok = task.tokenizer
    torch.manual_seed(0)
    actor = build_actor(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id, torch.device("cpu"))
    trainer = Trainer(cfg, task, tok, actor, Dist(), run_dir)
    if trainer.m.critic is not None:
        trainer.m.critic.value_head.weight.data.normal_(generator=torch.Generator().manual_seed(1))
    key = (cfg.rollout.n_prompts, cfg.rollout.n_per_prompt)
    if key not in _ROLLOUTS:  # the episodes depend on the (shared) initial policy and the sizes only
        _ROLLOUTS[key] = trainer.rollout()[0]
    batch = trainer.score_tokens(copy.deepcopy(_ROLLOUTS[key]))
    # a random policy's episodes all score -1 (format); varied outcomes give every estimator work
    mask = batch.action_mask
    last = (mask * torch.arange(mask.shape[1])).argmax(dim=1)
    batch.token_rewards = torch.zeros_like(batch.token_rewards)
    batch.token_rewards[torch.arange(len(last)), last] = torch.rand(len(last), generator=torch.Generator().manual_seed(3))
    trainer.add_kl_and_advantages(batch)
    metrics = trainer.update(batch)
    out = [metrics[k] for k in sorted(metrics) if k.startswith(("actor/", "critic/value_loss", "critic/grad_norm"))]
    g = torch.Generator().manual_seed(2)
    for model in (trainer.m.actor, trainer.m.critic):
        if model is None:
            continue
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        proj = torch.rand(flat.numel(), generator=g, dtype=torch.float64) - 0.5
        out += [float(flat.sum()), float((flat * flat).sum()), float(flat @ proj)]
    return out


@pytest.fixture(scope="module")
def stored():
    return json.loads(STORE.read_text())


@pytest.mark.parametrize("case", CASES, ids=case_name)
def test_an_update_matches_its_fingerprint(case, stored, tmp_path):
    got = fingerprint(case, tmp_path)
    assert got == pytest.approx(stored[case_name(case)], rel=1e-4, abs=1e-7)


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        prints = {case_name(c): fingerprint(c, Path(tmp) / str(i)) for i, c in enumerate(CASES)}
    STORE.write_text(json.dumps(prints, indent=1) + "\n")
    print(f"wrote {len(prints)} fingerprints to {STORE}")
