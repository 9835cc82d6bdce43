"""Advantage estimators: hand values, masked-token invariance, group statistics, registry, group ids."""

import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from agents import advantages
from agents.collectives import all_reduce
from agents.advantages import (
    AdvantageConfig,
    AdvantageInput,
    compute_gae,
    get_advantage,
    grpo_group_ids,
    masked_mean,
    masked_var,
    masked_whiten,
    register_advantage,
    repeat_for_group,
)


def _outcome_input(outcomes, group_ids, action_mask):
    """token_rewards with each outcome on the last action token of its row."""
    mask = torch.tensor(action_mask, dtype=torch.float32)
    rewards = torch.zeros_like(mask)
    for i, r in enumerate(outcomes):
        last = int(mask[i].nonzero().max())
        rewards[i, last] = r
    return AdvantageInput(rewards, mask, None, torch.tensor(group_ids))


# ---- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("gamma", 1.5), ("gamma", -0.1), ("lam", 2.0), ("eps", 0.0)])
def test_config_rejects_out_of_range_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}={value}"):
        AdvantageConfig(**{field: value})


# ---- GAE ----------------------------------------------------------------------------------------

def test_gae_matches_hand_values_1x3():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    # t=2: 1 - 0.4 = 0.6; t=1: 0.9*0.4 - 0.2 + 0.72*0.6 = 0.592; t=0: 0.9*0.2 - 0.5 + 0.72*0.592 = 0.10624
    assert torch.allclose(adv, torch.tensor([[0.10624, 0.592, 0.6]]))
    assert torch.allclose(ret, torch.tensor([[0.60624, 0.792, 1.0]]))


def test_gae_skips_masked_tokens_hand_values_2x4():
    # row 0: prompt, action, <info> (reward 5 and value 7 must be ignored), action
    # row 1: action, action, action, padding
    rewards = torch.tensor([[0.0, 0.0, 5.0, 1.0], [0.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 7.0, 0.25], [0.0, 1.0, 1.0, 3.0]])
    mask = torch.tensor([[0, 1, 0, 1], [1, 1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: t=3: 1 - 0.25 = 0.75; t=1: 0.25 - 0.5 + 0.5*0.75 = 0.125
    # row 1: t=2: 2 - 1 = 1; t=1: 1 - 1 + 0.5*1 = 0.5; t=0: 1 - 0 + 0.5*0.5 = 1.25
    assert torch.allclose(adv, torch.tensor([[0.0, 0.125, 0.0, 0.75], [1.25, 0.5, 1.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.0, 0.625, 0.0, 1.0], [1.25, 1.5, 2.0, 0.0]]))


@pytest.mark.parametrize("seed", range(6))
def test_gae_inserting_masked_tokens_leaves_policy_advantages_unchanged(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n_policy = rng.randint(2, 6)
    gamma, lam = rng.uniform(0.5, 1.0), rng.uniform(0.0, 1.0)
    r, v = torch.randn(1, n_policy, generator=gen), torch.randn(1, n_policy, generator=gen)
    base_adv, base_ret = compute_gae(r, v, torch.ones(1, n_policy), gamma, lam)

    # Build a longer row: masked runs of random length (random rewards and values) before, between, after.
    cols_r, cols_v, cols_m, policy_pos = [], [], [], []
    for k in range(n_policy + 1):
        for _ in range(rng.randint(0, 4)):
            cols_r.append(torch.randn(1, generator=gen).item())
            cols_v.append(torch.randn(1, generator=gen).item())
            cols_m.append(0.0)
        if k < n_policy:
            policy_pos.append(len(cols_m))
            cols_r.append(r[0, k].item())
            cols_v.append(v[0, k].item())
            cols_m.append(1.0)
    adv, ret = compute_gae(torch.tensor([cols_r]), torch.tensor([cols_v]), torch.tensor([cols_m]), gamma, lam)
    assert torch.allclose(adv[0, policy_pos], base_adv[0], atol=1e-6)
    assert torch.allclose(ret[0, policy_pos], base_ret[0], atol=1e-6)


def test_gae_ignores_values_on_masked_tokens():
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(2, 6, generator=gen)
    values = torch.randn(2, 6, generator=gen)
    mask = torch.tensor([[0, 1, 1, 0, 0, 1], [1, 0, 1, 1, 0, 0]])
    adv, ret = compute_gae(rewards, values, mask, 0.95, 0.9)
    for _ in range(3):
        noisy = torch.where(mask.bool(), values, torch.randn(2, 6, generator=gen) * 100)
        adv2, ret2 = compute_gae(rewards, noisy, mask, 0.95, 0.9)
        assert torch.allclose(adv, adv2) and torch.allclose(ret, ret2)


def test_gae_with_unit_gamma_lam_and_zero_values_is_return_to_go():
    rewards = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    adv, _ = compute_gae(rewards, torch.zeros(1, 4), torch.ones(1, 4), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[2.5, 1.5, 3.5, 3.0]]))


def test_gae_estimator_whitens_over_action_tokens_and_zeros_the_rest():
    gen = torch.Generator().manual_seed(2)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 1, 1]], dtype=torch.float32)
    data = AdvantageInput(torch.randn(2, 5, generator=gen), mask, torch.randn(2, 5, generator=gen),
                          torch.tensor([0, 1]))
    adv, ret = get_advantage("gae").fn(data, AdvantageConfig(gamma=0.9, lam=0.95))
    raw_adv, raw_ret = compute_gae(data.token_rewards, data.values, mask, 0.9, 0.95)
    on = mask.bool()
    assert torch.allclose(adv[on].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(adv[on].std(), torch.tensor(1.0), atol=1e-4)
    assert (adv[~on] == 0).all()
    assert torch.allclose(ret, raw_ret)  # returns are taken before whitening
    unwhitened, _ = get_advantage("gae").fn(data, AdvantageConfig(gamma=0.9, lam=0.95, whiten=False))
    assert torch.allclose(unwhitened, raw_adv)


def test_gae_estimator_without_values_names_the_missing_critic():
    data = AdvantageInput(torch.zeros(1, 3), torch.ones(1, 3), None, torch.tensor([0]))
    with pytest.raises(ValueError, match="values"):
        get_advantage("gae").fn(data, AdvantageConfig())


# ---- whitening ----------------------------------------------------------------------------------

def test_masked_whiten_uses_only_masked_positions():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(x, mask) == pytest.approx(2.0)
    assert masked_var(x, mask) == pytest.approx(1.0)  # unbiased: ((-1)^2 + 0 + 1^2) / 2
    w = masked_whiten(x, mask, eps=1e-8)
    assert torch.allclose(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)
    kept = masked_whiten(x, mask, eps=1e-8, shift_mean=False)
    assert torch.allclose(kept[0, :3], torch.tensor([1.0, 2.0, 3.0]), atol=1e-6)


def test_masked_mean_of_an_empty_mask_is_an_error():
    with pytest.raises(ValueError, match="no position"):
        masked_mean(torch.ones(2, 2), torch.zeros(2, 2))


def _whiten_on_rank(rank, world, tmp_dir, x, mask):
    dist.init_process_group("gloo", init_method=f"file://{tmp_dir}/init", rank=rank, world_size=world)
    try:
        rows = slice(rank, None, world)  # rank r holds rows r, r + world, ...: unequal token counts
        out = masked_whiten(x[rows], mask[rows], eps=1e-6, reduce=lambda t: all_reduce(t, "sum"))
        torch.save(out, f"{tmp_dir}/out{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_masked_whiten_across_two_ranks_equals_whole_batch(tmp_path):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 0, 0, 0], [1, 1, 0, 0, 1], [0, 0, 1, 1, 0]])
    mp.start_processes(_whiten_on_rank, args=(2, str(tmp_path), x, mask), nprocs=2, start_method="fork")
    whole = masked_whiten(x, mask, eps=1e-6)
    on = mask.bool()
    for rank in range(2):
        got = torch.load(tmp_path / f"out{rank}.pt")
        assert torch.allclose(got[on[rank::2]], whole[rank::2][on[rank::2]], atol=1e-6)


# ---- GRPO / Dr.GRPO / RLOO ----------------------------------------------------------------------

# Two groups of three, interleaved, with ids that are neither contiguous nor zero-based.
# group 7 outcomes [1, 0, 0]: mean 1/3, unbiased std sqrt(1/3); group 3 outcomes [2, 4, 0]: mean 2, std 2.
GROUPS = [7, 3, 7, 3, 7, 3]
OUTCOMES = [1.0, 2.0, 0.0, 4.0, 0.0, 0.0]
MASK_6x3 = [[1, 1, 1], [0, 1, 1], [1, 1, 0], [1, 0, 1], [0, 0, 1], [1, 1, 1]]


def test_grpo_matches_hand_values():
    data = _outcome_input(OUTCOMES, GROUPS, MASK_6x3)
    adv, ret = get_advantage("grpo").fn(data, AdvantageConfig())
    s = (1 / 3) ** 0.5
    expected = torch.tensor([(2 / 3) / s, 0.0, (-1 / 3) / s, 1.0, (-1 / 3) / s, -1.0])
    assert torch.allclose(adv, expected[:, None] * data.action_mask, atol=1e-5)
    assert torch.equal(ret, adv)


def test_dr_grpo_only_subtracts_the_group_mean():
    data = _outcome_input(OUTCOMES, GROUPS, MASK_6x3)
    adv, _ = get_advantage("grpo").fn(data, AdvantageConfig(grpo_norm_std=False))
    expected = torch.tensor([2 / 3, 0.0, -1 / 3, 2.0, -1 / 3, -2.0])
    assert torch.allclose(adv, expected[:, None] * data.action_mask, atol=1e-6)


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    data = _outcome_input(OUTCOMES, GROUPS, MASK_6x3)
    adv, ret = get_advantage("rloo").fn(data, AdvantageConfig())
    # group 7: [1 - 0, 0 - 0.5, 0 - 0.5]; group 3: [2 - 2, 4 - 1, 0 - 3]
    expected = torch.tensor([1.0, 0.0, -0.5, 3.0, -0.5, -3.0])
    assert torch.allclose(adv, expected[:, None] * data.action_mask, atol=1e-6)
    assert torch.equal(ret, adv)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_of_one_is_an_error_naming_the_group(name):
    data = _outcome_input([1.0, 0.0, 1.0], [0, 0, 5], [[1, 1], [1, 1], [1, 1]])
    with pytest.raises(ValueError, match=r"\[5\]"):
        get_advantage(name).fn(data, AdvantageConfig())


# ---- REINFORCE++ --------------------------------------------------------------------------------

def test_reinforce_pp_discounts_over_action_tokens_only_then_whitens():
    rewards = torch.tensor([[0.0, 0.0, 9.0, 1.0]])  # the 9 sits on a masked <info> token
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    data = AdvantageInput(rewards, mask, None, torch.tensor([0]))
    adv, ret = get_advantage("reinforce_pp").fn(data, AdvantageConfig(gamma=0.5, eps=1e-8))
    # G_3 = 1; G_1 = 0.5 * 1; G_0 = 0.5 * 0.5; the masked token neither adds 9 nor costs a discount step
    assert torch.allclose(ret, torch.tensor([[0.25, 0.5, 0.0, 1.0]]))
    g = torch.tensor([0.25, 0.5, 1.0])
    assert torch.allclose(adv[0, [0, 1, 3]], (g - g.mean()) / g.std(), atol=1e-6)
    assert adv[0, 2] == 0


# ---- group ids ----------------------------------------------------------------------------------

def test_group_ids_are_assigned_before_repeating_and_match_prompts():
    prompts = ["q0", "q1", "q2"]
    batch = repeat_for_group(prompts, 4)
    ids = grpo_group_ids(len(prompts), 4)
    assert ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert [prompts[i] for i in ids.tolist()] == batch


def test_group_ids_give_grpo_groups_of_n_per_prompt():
    ids = grpo_group_ids(2, 3)
    outcomes = torch.tensor([[1.0], [0.0], [0.0], [1.0], [1.0], [0.0]])
    data = AdvantageInput(outcomes, torch.ones(6, 1), None, ids)
    adv, _ = get_advantage("rloo").fn(data, AdvantageConfig())
    assert torch.allclose(adv[:, 0], torch.tensor([1.0, -0.5, -0.5, 0.5, 0.5, -1.0]))


def test_repeat_rejects_zero_copies_naming_the_config_key():
    with pytest.raises(ValueError, match="n_per_prompt"):
        repeat_for_group(["q"], 0)


# ---- registry -----------------------------------------------------------------------------------

def test_registry_flags_which_estimators_need_a_critic():
    assert get_advantage("gae").needs_critic
    assert not any(get_advantage(n).needs_critic for n in ("grpo", "rloo", "reinforce_pp"))


def test_registering_a_taken_name_raises():
    with pytest.raises(ValueError, match="'gae' is already registered"):
        register_advantage("gae", needs_critic=True)(lambda data, cfg: (data.action_mask, data.action_mask))


def test_unknown_estimator_lists_the_known_ones():
    with pytest.raises(ValueError, match="gae, grpo, reinforce_pp, rloo"):
        get_advantage("ppo")


def test_a_new_estimator_registers_and_is_found(monkeypatch):
    monkeypatch.setattr(advantages, "_ESTIMATORS", dict(advantages._ESTIMATORS))

    @register_advantage("outcome_sign", needs_critic=False, outcome_only=True)
    def outcome_sign(data, cfg):
        adv = data.token_rewards.sum(-1).sign()[:, None] * data.action_mask
        return adv, adv

    est = get_advantage("outcome_sign")
    assert est.fn is outcome_sign and est.outcome_only and not est.needs_critic
    data = _outcome_input([2.0, -1.0], [0, 0], [[1, 1], [0, 1]])
    assert est.fn(data, AdvantageConfig())[0].tolist() == [[1.0, 1.0], [0.0, -1.0]]
