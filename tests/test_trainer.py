"""End to end on CPU: PPO steps change the weights, checkpoints resume exactly, a crash while writing a
checkpoint leaves the previous one usable, every estimator runs without code changes, NaN skips."""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import TINY_RUN

import train
from agents.trainer import alpha_means, alpha_parts, latest_checkpoint

TINY = [
    *TINY_RUN, "task.n_test=8", "episode.max_response_tokens=48",
    "sft.enabled=true", "sft.n_examples=32", "sft.epochs=1", "sft.batch_size=16",
    "rollout.n_prompts=4", "algorithm.minibatch_size=4", "algorithm.ppo_epochs=1",
    "eval_every=0", "save_every=1", "keep_checkpoints=5",
]


def run(tmp_path, name, *extra):
    return train.main(["--config", "configs/routeworld_tiny.yaml", f"run_dir={tmp_path / name}", *TINY, *extra])


def weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "policy" / "model.safetensors"))


def test_ppo_steps_change_weights_and_resume_continues_identically(tmp_path):
    run(tmp_path, "a", "total_steps=3")
    ckpts = tmp_path / "a" / "checkpoints"
    w1, w3 = weights(ckpts / "step_000001"), weights(ckpts / "step_000003")
    assert any(not torch.equal(w1[k], w3[k]) for k in w1), "PPO did not change the weights"
    # a second run stopped after 2 steps, then resumed for the third, ends with the same weights
    run(tmp_path, "b", "total_steps=2")
    train.main(["--config", "configs/routeworld_tiny.yaml", "--resume", f"run_dir={tmp_path / 'b'}", *TINY,
                "total_steps=3"])
    w3b = weights(tmp_path / "b" / "checkpoints" / "step_000003")
    for k in w3:
        assert torch.allclose(w3[k], w3b[k], atol=1e-6), k
    log_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log_b if not m.get("final")] == [1, 2, 3]  # nothing logged twice
    assert [m["step"] for m in log_b if m.get("final")] == [3]
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for key in ("train/reward", "train/em", "train/format_error", "train/raw_cost", "kl/ref", "actor/entropy",
                "actor/clip_frac", "actor/approx_kl", "critic/explained_variance", "critic/value_loss"):
        assert key in metrics[0], key
    assert (tmp_path / "a" / "curves.png").exists() and (tmp_path / "a" / "results.md").exists()


def test_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    run(tmp_path, "c", "total_steps=1")
    before = latest_checkpoint(tmp_path / "c")
    script = textwrap.dedent(f"""
        import os, torch, train
        from agents import trainer
        real_save = torch.save
        def dying_save(obj, path, *a, **k):  # the process dies half-way through the checkpoint
            real_save(obj, path, *a, **k)
            os._exit(17)
        trainer.torch.save = dying_save
        train.main(["--config", "configs/routeworld_tiny.yaml", "--resume", "run_dir={tmp_path / 'c'}",
                    *{TINY!r}, "total_steps=2"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(train.__file__).parent, capture_output=True)
    assert proc.returncode == 17, proc.stderr.decode()[-2000:]
    assert any(p.name.startswith(".tmp_") for p in (tmp_path / "c" / "checkpoints").iterdir())
    assert latest_checkpoint(tmp_path / "c") == before
    rows = train.main(["--config", "configs/routeworld_tiny.yaml", "--resume", f"run_dir={tmp_path / 'c'}",
                       *TINY, "total_steps=2"])
    assert latest_checkpoint(tmp_path / "c").name == "step_000002" and "trained policy" in rows


def test_a_corrupt_checkpoint_falls_back_and_a_changed_meaning_is_refused(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run(tmp_path, "d", "total_steps=2")
    ckpts = tmp_path / "d" / "checkpoints"
    (ckpts / "step_000002" / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"episode.alpha: 0.0 -> 0.5.*--resume-anyway"):
        run(tmp_path, "d", "total_steps=3", "episode.alpha=0.5", "--resume")
    rows = run(tmp_path, "d", "total_steps=3", "--resume")
    assert f"checkpoint {ckpts / 'step_000002'} is unreadable" in caplog.text
    assert "resumed from" in caplog.text and str(ckpts / "step_000001") in caplog.text
    assert latest_checkpoint(tmp_path / "d").name == "step_000003" and "trained policy" in rows
    run(tmp_path, "d", "total_steps=3", "episode.alpha=0.5", "--resume-anyway")  # the user's call


@pytest.mark.parametrize("algo", [
    ["algorithm.advantage=gae"],
    ["algorithm.advantage=grpo", "rollout.n_per_prompt=2", "algorithm.kl.placement=loss", "algorithm.kl.estimator=k3"],
    ["algorithm.advantage=rloo", "rollout.n_per_prompt=2", "algorithm.kl.placement=loss", "algorithm.kl.estimator=k2"],
    ["algorithm.advantage=reinforce_pp"],
])
def test_every_estimator_is_a_config_switch(tmp_path, algo):
    rows = run(tmp_path, "x", "total_steps=1", "save_every=0", "sft.n_examples=8", *algo)
    assert set(rows) >= {"trained policy", "SFT start"}


def test_non_finite_loss_skips_the_update(tmp_path):
    from agents.config import load_config
    from agents.distributed import Dist
    from agents.policy import build_actor
    from agents.trainer import Trainer
    from envs.tasks import make_task
    cfg = load_config("configs/routeworld_tiny.yaml", [f"run_dir={tmp_path}", *TINY, "sft.enabled=false"])
    task = make_task(cfg)
    tok = task.tokenizer
    actor = build_actor(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id, torch.device("cpu"))
    trainer = Trainer(cfg, task, tok, actor, Dist(), tmp_path)
    batch, _, _ = trainer.rollout()
    batch = trainer.score_tokens(batch)
    trainer.add_kl_and_advantages(batch)
    batch.advantages = batch.advantages * float("nan")
    before = {k: v.clone() for k, v in actor.state_dict().items()}
    metrics = trainer.update(batch)
    assert metrics["train/skipped_updates"] >= 1
    assert all(torch.equal(before[k], v) for k, v in actor.state_dict().items())


def test_fast_engine_trains_exactly_like_the_simple_path_with_greedy_rollouts(tmp_path):
    """Rollouts through FastEngine (weights reloaded after every update) give the same episodes, so the
    same updates, as the simple path."""
    for engine in ("simple", "fast"):
        run(tmp_path, engine, "total_steps=2", "save_every=0", "rollout.temperature=0", f"rollout.engine={engine}")
    ws, wf = (weights(tmp_path / e / "checkpoints" / "step_000002") for e in ("simple", "fast"))
    for k in ws:
        assert torch.allclose(ws[k], wf[k], atol=1e-6), k
    samples = [(tmp_path / e / "samples.jsonl").read_text() for e in ("simple", "fast")]
    assert samples[0] == samples[1] and samples[0]


def test_save_final_false_writes_no_checkpoint(tmp_path):
    run(tmp_path, "n", "total_steps=1", "save_every=0", "save_final=false")
    assert latest_checkpoint(tmp_path / "n") is None


def test_packed_micro_batches_score_and_update_like_padded_ones(tmp_path):
    """rollout.pack_sequences runs each micro-batch as one sequence without padding: the same batch
    gets the same old log-probs, reference log-probs and values in its own rows, and the same
    losses and gradient norms in an update."""
    import copy

    from agents.config import load_config
    from agents.distributed import Dist
    from agents.policy import build_actor, sequence_logprobs
    from agents.trainer import Trainer
    from envs.tasks import make_task
    results = []
    for pack in ("false", "true"):
        cfg = load_config("configs/routeworld_tiny.yaml", [f"run_dir={tmp_path / pack}", *TINY, "sft.enabled=false",
                                                            "rollout.n_prompts=8", "algorithm.minibatch_size=8",
                                                            "rollout.micro_batch_tokens=400",
                                                            f"rollout.pack_sequences={pack}"])
        task = make_task(cfg)
        tok = task.tokenizer
        torch.manual_seed(0)
        actor = build_actor(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id, torch.device("cpu"))
        trainer = Trainer(cfg, task, tok, actor, Dist(), tmp_path / pack)
        trainer.m.critic.value_head.weight.data.normal_()  # non-zero values, so they are compared
        batch, _, _ = trainer.rollout()
        batch = trainer.score_tokens(batch)
        with torch.no_grad():  # the whole batch in one padded pass: each row's scores land in its own row
            direct, _ = sequence_logprobs(trainer.m.actor, batch.input_ids, batch.attention_mask, batch.position_ids)
        assert torch.allclose(batch.old_logprobs * batch.attention_mask, direct * batch.attention_mask, atol=1e-5)
        trainer.add_kl_and_advantages(batch)
        scored = copy.deepcopy(batch)
        results.append((scored, trainer.update(batch)))
    (padded, m_padded), (packed, m_packed) = results
    assert torch.equal(padded.input_ids, packed.input_ids)
    assert len(padded) == 8 and bool(padded.attention_mask.sum(1).min() < padded.attention_mask.sum(1).max())
    mask = padded.attention_mask.float()
    for name in ("old_logprobs", "ref_logprobs", "values", "advantages"):
        a, b = getattr(padded, name) * mask, getattr(packed, name) * mask
        assert torch.allclose(a, b, atol=1e-5), (name, float((a - b).abs().max()))
    for key in ("actor/pg_loss", "critic/value_loss", "actor/grad_norm", "critic/grad_norm", "actor/entropy"):
        assert m_packed[key] == pytest.approx(m_padded[key], rel=1e-4, abs=1e-7), key


def test_a_conditioned_run_shares_alpha_within_groups_reports_each_alpha_and_saves_its_settings(tmp_path):
    from agents.routing_settings import load_routing_settings
    rows = train.main(["--config", "configs/routeworld_tiny_conditioned.yaml", f"run_dir={tmp_path / 'c'}", *TINY,
                       "total_steps=1", "report_alphas=[0, 0.8]", "algorithm.advantage=rloo",
                       "algorithm.kl.placement=loss", "algorithm.kl.estimator=k3", "rollout.n_per_prompt=2",
                       "n_samples_logged=8"])
    for alpha in ("0", "0.8"):
        for name in ("SFT start", "trained policy", "oracle plan", "fixed: Geo-Expert"):
            assert f"{name} (alpha {alpha})" in rows, name
    samples = [json.loads(line) for line in (tmp_path / "c" / "samples.jsonl").read_text().splitlines()]
    alphas = [s["alpha"] for s in samples]
    assert len(alphas) == 8 and alphas[0::2] == alphas[1::2]  # a group (two rollouts of a prompt) shares it
    assert set(alphas) <= {0.0, 0.3, 0.5, 0.8}
    settings = load_routing_settings(tmp_path / "c" / "checkpoints" / "best" / "policy")
    assert settings.is_conditioned and settings.alpha == {"sample": [0.0, 0.3, 0.5, 0.8]}
    assert settings.prompt_template == "compact" and settings.max_turns == 2
    logged = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    per_alpha = {k for m in logged for k in m if "@alpha=" in k}
    assert any(k.startswith("train/raw_cost@alpha=") for k in per_alpha)
    assert any(k.startswith("val/reward@alpha=") for k in per_alpha)
    assert {k.split("=")[1] for k in per_alpha} <= {"0", "0.3", "0.5", "0.8"}
    pinned = [row for name, row in rows.items() if "(alpha " in name]  # played at one weight: no breakdown
    assert pinned and not any("@alpha=" in k for row in pinned for k in row)


def test_each_sampled_cost_weight_gets_the_mean_of_its_own_episodes_across_ranks():
    def episode(alpha, reward, cost):
        return {"alpha": alpha, "reward": {"total": reward}, "raw_cost": cost}
    ranks = [[episode(0.0, 1.0, 120.0), episode(0.8, 0.9, 1.0), episode(0.8, 0.5, 3.0)],
             [episode(0.0, 0.0, 80.0), episode(0.0, 1.0, 100.0)]]
    alphas = [0.0, 0.3, 0.8]
    parts = [alpha_parts(r, "train", alphas) for r in ranks]
    n = [len(r) for r in ranks]  # the trainer's mean over ranks weights each rank by its episodes
    averaged = {k: sum(w * p[k] for w, p in zip(n, parts)) / sum(n) for k in parts[0]}
    means = alpha_means({"train/reward": 0.68, **averaged}, "train", alphas)
    assert means == pytest.approx({"train/reward": 0.68, "train/reward@alpha=0": 2 / 3, "train/raw_cost@alpha=0": 100.0,
                                   "train/reward@alpha=0.8": 0.7, "train/raw_cost@alpha=0.8": 2.0})
