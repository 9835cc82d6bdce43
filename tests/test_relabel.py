"""Cost-weight relabelling: a copy states the other weight wherever the episode stated its own, is
scored by the same reward at that weight, gets its own group, and is weighted by the truncated ratio."""

import pytest
import torch

from agents.relabel import check_cues, relabel, swap_runs, truncated_ratio


def test_swap_runs_replaces_whole_runs_of_one_kind_only():
    ids, flags = [1, 7, 8, 2, 7, 8, 7], [True, True, True, False, False, True, False]
    out, out_flags, n = swap_runs(ids, flags, [7, 8], [9])
    assert n == 1 and out == [1, 9, 2, 7, 8, 7] and out_flags == [True, True, False, False, True, False]


def test_truncated_ratio_is_one_for_sampled_rows_and_capped_at_one():
    old = torch.tensor([[-1.0, -1.0], [-0.5, -0.5], [-3.0, -3.0]])
    mask = torch.ones(3, 2)
    w = truncated_ratio(old, mask, torch.tensor([-1, 0, 0]))
    assert w[0] == 1.0 and w[1] == 1.0  # more likely at alpha' than sampled: capped
    assert torch.isclose(w[2], torch.exp(torch.tensor(-4.0)))


def test_a_relabelled_episode_states_the_other_weight_and_is_scored_at_it():
    from agents.config import load_config
    from envs.tasks import make_task
    from envs.vector import MultiRouteVectorEnv
    from rewards import make_cost_normalizer
    from tests.test_trainer import TINY
    cfg = load_config("configs/routeworld_tiny_conditioned.yaml", [*TINY, "sft.enabled=false"])
    task = make_task(cfg)
    tok = task.tokenizer
    env = MultiRouteVectorEnv(tok, task.pool, cfg.episode)
    q = dict(task.train[0], alpha=0.8)
    name = max(task.pool.specs, key=lambda s: s.price_per_1m_output).name  # a priced call, so alpha changes the reward
    env.reset([q])
    ep = env.episodes[0]
    thought = "<think> the weight. Cost weight: 0.8. </think>\n"
    ep.push_many(tok.encode(f"{thought}<search> {name}: {q['question']} </search>", add_special_tokens=False))
    env.resolve()
    ep.push_many(tok.encode(f"<think> done </think>\n<answer> {q['golden_answers'][0]} </answer>", add_special_tokens=False))
    assert ep.done and ep.raw_cost > 0
    norm = make_cost_normalizer(cfg.cost.normalizer, **cfg.cost.options)
    copy = relabel(ep, 0.0, tok)
    cue = lambda a: tok.encode(f"Cost weight: {a:g}.", add_special_tokens=False)
    assert len(cue(0.8)) == 1 and len(cue(0.0)) == 1  # the world tokenizer keeps each weight's words whole
    assert ep.prompt_ids.count(cue(0.8)[0]) == 1 and copy.prompt_ids.count(cue(0.0)[0]) == 1
    assert cue(0.8)[0] not in copy.prompt_ids + copy.response_ids  # the restated thought too
    assert copy.response_ids.count(cue(0.0)[0]) == 1 and len(copy.inserted) == len(ep.inserted)
    assert ep.alpha == 0.8 and copy.calls is ep.calls
    at_08, at_0 = ep.score(norm), copy.score(norm)  # the answer is right, so EM 1 at alpha 0
    assert at_0.total == 1.0 and 0.0 < at_08.total < 1.0  # at 0.8 the call's cost counts


def test_a_relabelling_step_trains_each_episode_at_every_trained_weight_in_groups_of_its_own(tmp_path):
    from agents.config import load_config
    from agents.distributed import Dist
    from agents.policy import build_actor
    from agents.trainer import Trainer
    from envs.tasks import make_task
    from tests.test_trainer import TINY
    cfg = load_config("configs/routeworld_tiny_conditioned.yaml", [  # the stage draws 0 and 0.8; 0.5 is only restated
        f"run_dir={tmp_path}", *TINY, "sft.enabled=false", "episode.alpha={sample: [0.0, 0.5, 0.8]}",
        "alpha_curriculum=[[5, {sample: [0.0, 0.8]}]]", "algorithm.advantage=grpo", "algorithm.kl.placement=loss",
        "algorithm.kl.estimator=k3", "rollout.n_per_prompt=2", "algorithm.relabel_alpha=true"])
    task = make_task(cfg)
    tok = task.tokenizer
    torch.manual_seed(0)
    actor = build_actor(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id, torch.device("cpu"))
    trainer = Trainer(cfg, task, tok, actor, Dist(), tmp_path)
    batch, summaries, _ = trainer.rollout()
    n = len(summaries)
    assert n == 8 and len(batch) == 3 * n  # each episode twice more, at the two other trained weights
    assert {s["alpha"] for s in summaries} <= {0.0, 0.8}
    assert batch.source_rows[:n].eq(-1).all() and sorted(batch.source_rows[n:].tolist()) == sorted(list(range(n)) * 2)
    sampled_groups = set(batch.group_ids[:n].tolist())
    copy_groups = batch.group_ids[n:].tolist()
    assert sampled_groups.isdisjoint(copy_groups) and len(set(copy_groups)) == 2 * len(sampled_groups)
    assert torch.equal(batch.raw_cost[n:], batch.raw_cost[batch.source_rows[n:]])  # the same calls
    batch = trainer.score_tokens(batch)
    metrics = trainer.add_kl_and_advantages(batch)
    assert 0.0 < metrics["relabel/ratio_mean"] <= 1.0
    update = trainer.update(batch)
    assert update["actor/grad_norm"] > 0


def test_relabelling_is_refused_before_training_when_a_prompt_does_not_hold_its_weights_words():
    from agents.config import load_config
    from envs.episode import episode_prompts
    from envs.tasks import make_task
    from tests.test_trainer import TINY
    cfg = load_config("configs/routeworld_tiny_conditioned.yaml", [*TINY, "sft.enabled=false"])
    task = make_task(cfg)
    tok, q = task.tokenizer, task.train[0]["question"]
    check_cues(episode_prompts([q, q], tok, task.pool, cfg.episode, [0.0, 0.8]), [0.0, 0.8], tok)
    wrong = episode_prompts([q], tok, task.pool, cfg.episode, [0.0])  # states 0, checked for 0.8
    with pytest.raises(ValueError, match="Cost weight: 0.8"):
        check_cues(wrong, [0.8], tok)


def test_relabelling_needs_a_sample_set_of_weights():
    from agents.config import load_config
    with pytest.raises(ValueError, match="algorithm.relabel_alpha"):
        load_config("configs/routeworld_tiny.yaml", ["algorithm.relabel_alpha=true"])
    with pytest.raises(ValueError, match="algorithm.relabel_alpha"):
        load_config("configs/routeworld_tiny_conditioned.yaml", ["episode.alpha={low: 0.0, high: 0.8}",
                                                                 "algorithm.relabel_alpha=true"])
