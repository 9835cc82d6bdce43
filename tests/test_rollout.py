"""The rollout engine: the simple-path equivalence, batch layout independence, masks."""

import torch

from agents.batch import build_batch, micro_batches
from agents.policy import sequence_logprobs
from agents.rollout import episode_generator, run_rollouts
from envs.candidates import CandidatePool, CandidateSpec
from envs.candidates.simulated import SimulatedBackend
from envs.episode import EpisodeConfig
from envs.vector import MultiRouteVectorEnv
from tiny import tiny_qwen, tiny_tokenizer

SPECS = [CandidateSpec("Geo-Expert", "geo", 1, 0.2)]


def make_env(tok, max_tokens=12):
    pool = CandidatePool(SPECS, SimulatedBackend({"Geo-Expert": lambda r: "Tessaly"}))
    return MultiRouteVectorEnv(tok, pool, EpisodeConfig(max_response_tokens=max_tokens, prompt_template="compact"))


EXAMPLES = [{"question": q, "golden_answers": ["x"]} for q in ("Where is Korvan?", "Who is he?", "A much longer question here?")]


def test_greedy_rollout_equals_transformers_generate():
    tok = tiny_tokenizer()
    model = tiny_qwen(len(tok))
    env = make_env(tok, max_tokens=10)
    logps, _ = run_rollouts(model, env, EXAMPLES, 0.0, 1.0, 0, 0, tok.pad_token_id)
    for ep, lp in zip(env.episodes, logps):
        ref = model.generate(torch.tensor([ep.prompt_ids]), max_new_tokens=len(ep.response_ids), do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=None)
        assert ep.response_ids == ref[0, len(ep.prompt_ids):].tolist()
        # and the engine's log-probs equal a teacher-forced forward of the finished sequence
        ids = torch.tensor([ep.prompt_ids + ep.response_ids])
        tf, _ = sequence_logprobs(model, ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
        assert torch.allclose(torch.tensor(lp), tf[0, len(ep.prompt_ids):], atol=1e-4)


def test_sampled_episode_does_not_depend_on_batch_layout():
    tok = tiny_tokenizer()
    model = tiny_qwen(len(tok))
    env = make_env(tok)
    run_rollouts(model, env, EXAMPLES, 1.0, 0.9, seed=7, step=3, pad_id=tok.pad_token_id)
    together = [e.response_ids for e in env.episodes]
    alone = []
    for i, ex in enumerate(EXAMPLES):
        run_rollouts(model, env, [ex], 1.0, 0.9, seed=7, step=3, pad_id=tok.pad_token_id, index_offset=i)
        alone.append(env.episodes[0].response_ids)
    assert together == alone


def test_episode_streams_differ_by_step_and_index():
    a = torch.rand(3, generator=episode_generator(0, 1, 2))
    assert torch.equal(a, torch.rand(3, generator=episode_generator(0, 1, 2)))
    assert not torch.equal(a, torch.rand(3, generator=episode_generator(0, 2, 2)))
    assert not torch.equal(a, torch.rand(3, generator=episode_generator(0, 1, 3)))


def test_batch_masks_inserted_tokens_and_places_reward_on_last_action():
    tok = tiny_tokenizer()
    env = make_env(tok, max_tokens=64)
    env.reset(EXAMPLES[:1])
    ep = env.episodes[0]
    text = "<think> a </think>\n<search> Geo-Expert: where? </search>"
    ep.push_many(tok.encode(text, add_special_tokens=False))
    env.resolve()
    ep.push_many(tok.encode("<think> b </think>\n<answer> x </answer>", add_special_tokens=False))
    batch = build_batch([ep], [0.75], [0], [[0.0] * ep.policy_tokens], tok.pad_token_id)
    n = len(ep.prompt_ids)
    expected = [0.0] * n + [0.0 if ins else 1.0 for ins in ep.inserted]
    assert batch.action_mask[0].tolist() == expected
    last = max(i for i, m in enumerate(expected) if m)
    assert batch.token_rewards[0, last] == 0.75 and batch.token_rewards.sum() == 0.75


def test_micro_batches_respect_the_token_budget_and_keep_rows():
    tok = tiny_tokenizer()
    env = make_env(tok)
    logps, _ = run_rollouts(tiny_qwen(len(tok)), env, EXAMPLES * 3, 1.0, 1.0, 0, 0, tok.pad_token_id)
    batch = build_batch(env.episodes, [0.0] * 9, list(range(9)), logps, tok.pad_token_id)
    pieces = micro_batches(batch, token_budget=60)
    assert sorted(torch.cat([p.group_ids for p in pieces]).tolist()) == batch.group_ids.tolist()  # each row once
    assert all(p.input_ids.numel() <= 60 or len(p) == 1 for p in pieces)
    lengths = [n for p in pieces for n in p.attention_mask.sum(1).tolist()]
    assert lengths == sorted(lengths)  # sorted by length: little padding
    packed = micro_batches(batch, token_budget=60, packed=True)
    assert all(int(p.attention_mask.sum()) <= 60 or len(p) == 1 for p in packed)
    assert len(packed) <= len(pieces)


def test_forced_schedule_makes_a_random_model_call_and_answer():
    from agents.rollout import ForcedSchedule
    tok = tiny_tokenizer()
    env = make_env(tok, max_tokens=80)
    forced = ForcedSchedule.calls_then_answer(tok, "Geo-Expert", [3, 30], 55)
    logps, _ = run_rollouts(tiny_qwen(len(tok)), env, EXAMPLES, 1.0, 1.0, 0, 0, tok.pad_token_id, forced=forced)
    for ep, lp in zip(env.episodes, logps):
        if ep.end_reason == "answer":
            assert len(ep.calls) == 2 and len(lp) == ep.policy_tokens
    assert any(ep.end_reason == "answer" for ep in env.episodes)
