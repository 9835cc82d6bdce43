"""Policy, value and KL losses; loss aggregation over micro-batches and ranks; KL placement checks."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from agents.collectives import all_reduce
from agents.kl import kl_estimate
from agents.losses import (
    LOSS_AGGREGATIONS,
    agg_loss,
    kl_loss,
    policy_loss,
    step_denominator,
    validate_kl_placement,
    value_loss,
)

# ---- policy loss --------------------------------------------------------------------------------

# ratios 1.5 / 0.5 / 1.0 against advantages of both signs, clip_eps 0.2
LOG_RATIO = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]]))
ADV = torch.tensor([[1.0, -1.0, 2.0], [-1.0, 1.0, 0.0]])


def test_ppo_clipped_surrogate_matches_hand_values():
    loss, clip_frac = policy_loss(LOG_RATIO, torch.zeros(2, 3), ADV, clip_eps=0.2)
    # max(-A r, -A clip(r)): (1.5, +1) -> max(-1.5, -1.2); (0.5, -1) -> max(0.5, 0.8); (1, 2) -> -2
    #                        (1.5, -1) -> max(1.5, 1.2);  (0.5, +1) -> max(-0.5, -0.8); A = 0 -> 0
    assert torch.allclose(loss, torch.tensor([[-1.2, 0.8, -2.0], [1.5, -0.5, 0.0]]))
    assert clip_frac.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


def test_clipped_tokens_get_no_gradient():
    logp = LOG_RATIO.clone().requires_grad_(True)
    loss, clip_frac = policy_loss(logp, torch.zeros(2, 3), ADV, clip_eps=0.2)
    loss.sum().backward()
    assert (logp.grad[clip_frac.bool()] == 0).all()
    assert (logp.grad[~clip_frac.bool() & (ADV != 0)] != 0).all()


def test_dual_clip_caps_the_loss_of_negative_advantages_only():
    log_ratio = torch.log(torch.tensor([[5.0, 2.0, 5.0]]))
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    plain, _ = policy_loss(log_ratio, torch.zeros(1, 3), adv, clip_eps=0.2)
    dual, _ = policy_loss(log_ratio, torch.zeros(1, 3), adv, clip_eps=0.2, dual_clip=3.0)
    # (5, -1): PPO gives 5, capped at -3 * -1 = 3; (2, -1): 2 < 3 stays; (5, +1): clipped to -1.2 either way
    assert torch.allclose(plain, torch.tensor([[5.0, 2.0, -1.2]]))
    assert torch.allclose(dual, torch.tensor([[3.0, 2.0, -1.2]]))


@pytest.mark.parametrize("dual_clip", [1.0, 0.5])
def test_dual_clip_must_exceed_one(dual_clip):
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), dual_clip=dual_clip)


# ---- value loss ---------------------------------------------------------------------------------

def test_value_loss_takes_the_larger_of_clipped_and_unclipped_error():
    values = torch.tensor([[1.0, 0.2, -1.0, 1.0]])
    old = torch.zeros(1, 4)
    returns = torch.tensor([[0.4, 1.0, 0.0, 2.0]])
    # clipped V (eps 0.5): [0.5, 0.2, -0.5, 0.5]
    # unclipped err^2 [0.36, 0.64, 1.0, 1.0]; clipped err^2 [0.01, 0.64, 0.25, 2.25]
    clipped = value_loss(values, old, returns, clip_eps=0.5)
    assert torch.allclose(clipped, torch.tensor([[0.18, 0.32, 0.5, 1.125]]))
    unclipped = value_loss(values, old, returns, clip_eps=None)
    assert torch.allclose(unclipped, torch.tensor([[0.18, 0.32, 0.5, 0.5]]))


# ---- KL loss ------------------------------------------------------------------------------------

def test_kl_loss_is_the_per_token_estimate():
    logp, ref = torch.tensor([[-0.5, -2.0]]), torch.tensor([[-1.0, -1.0]])
    assert torch.equal(kl_loss(logp, ref, "k3"), kl_estimate(logp, ref, "k3"))
    assert torch.allclose(kl_loss(logp, ref, "k2"), torch.tensor([[0.125, 0.5]]))


# ---- aggregation --------------------------------------------------------------------------------

LOSS_2x4 = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
MASK_2x4 = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", (1 + 2 + 5 + 6 + 7) / 5),
    ("seq-mean-token-mean", ((1 + 2) / 2 + (5 + 6 + 7) / 3) / 2),
    ("seq-mean-token-sum", ((1 + 2) + (5 + 6 + 7)) / 2),
])
def test_agg_loss_matches_hand_values(mode, expected):
    denominator = step_denominator([MASK_2x4], mode)
    assert agg_loss(LOSS_2x4, MASK_2x4, mode, denominator).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", list(LOSS_AGGREGATIONS))
def test_sequence_without_action_tokens_contributes_nothing(mode):
    loss = torch.cat([LOSS_2x4, torch.full((1, 4), 1e6)])
    mask = torch.cat([MASK_2x4, torch.zeros(1, 4, dtype=torch.long)])
    full = agg_loss(loss, mask, mode, step_denominator([mask], mode))
    without = agg_loss(LOSS_2x4, MASK_2x4, mode, step_denominator([MASK_2x4], mode))
    assert full.item() == pytest.approx(without.item())


# 4 sequences with 4, 1, 2 and 3 action tokens: micro-batches and ranks get unequal counts.
MASK_4x4 = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1]])
X_4x4 = torch.linspace(-1.0, 2.0, 16).reshape(4, 4)


def _per_token_loss(w, rows):
    return (w * X_4x4[rows] - 0.3) ** 2  # any differentiable function of a shared parameter


def _full_batch(mode):
    w = torch.tensor([0.5, -1.0, 2.0, 0.1], requires_grad=True)
    loss = agg_loss(_per_token_loss(w, slice(None)), MASK_4x4, mode, step_denominator([MASK_4x4], mode))
    loss.backward()
    return loss.detach(), w.grad


@pytest.mark.parametrize("mode", list(LOSS_AGGREGATIONS))
def test_gradient_accumulation_gives_the_full_batch_loss_and_gradient(mode):
    full_loss, full_grad = _full_batch(mode)
    w = torch.tensor([0.5, -1.0, 2.0, 0.1], requires_grad=True)
    micro = [slice(0, 2), slice(2, 4)]
    denominator = step_denominator([MASK_4x4[rows] for rows in micro], mode)
    total = torch.tensor(0.0)
    for rows in micro:
        loss = agg_loss(_per_token_loss(w, rows), MASK_4x4[rows], mode, denominator)
        loss.backward()  # gradients accumulate in w.grad, as across micro-batches
        total += loss.detach()
    assert torch.allclose(total, full_loss)
    assert torch.allclose(w.grad, full_grad)


@pytest.mark.parametrize("mode", list(LOSS_AGGREGATIONS))
def test_two_rank_split_with_global_denominator_equals_full_batch(mode):
    full_loss, full_grad = _full_batch(mode)
    ranks = [[0, 2], [1, 3]]
    denominator = step_denominator([MASK_4x4], mode)  # what the all-reduce over both ranks yields
    losses, grads = [], []
    for rows in ranks:
        w = torch.tensor([0.5, -1.0, 2.0, 0.1], requires_grad=True)
        loss = agg_loss(_per_token_loss(w, rows), MASK_4x4[rows], mode, denominator)
        loss.backward()
        losses.append(loss.detach())
        grads.append(w.grad)
    assert torch.allclose(sum(losses), full_loss)
    assert torch.allclose(sum(grads), full_grad)
    # DDP averages gradients over ranks, so each rank scales its loss by world_size first.
    assert torch.allclose(torch.stack([2 * g for g in grads]).mean(0), full_grad)


def _denominator_on_rank(rank, world, tmp_dir, masks_per_rank, mode):
    dist.init_process_group("gloo", init_method=f"file://{tmp_dir}/init", rank=rank, world_size=world)
    try:
        count = step_denominator(masks_per_rank[rank], mode, reduce=lambda t: all_reduce(t, "sum"))
        torch.save(torch.tensor(count), f"{tmp_dir}/out{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode, expected", [("token-mean", 10.0), ("seq-mean-token-mean", 4.0)])
def test_step_denominator_sums_over_ranks(tmp_path, mode, expected):
    # rank 0: two micro-batches (rows 0 and 1); rank 1: one micro-batch (rows 2, 3) plus an empty row
    empty_row = torch.zeros(1, 4, dtype=torch.long)
    masks_per_rank = [[MASK_4x4[:1], MASK_4x4[1:2]], [torch.cat([MASK_4x4[2:], empty_row])]]
    mp.start_processes(_denominator_on_rank, args=(2, str(tmp_path), masks_per_rank, mode), nprocs=2,
                       start_method="fork")
    assert [torch.load(tmp_path / f"out{r}.pt").item() for r in range(2)] == [expected, expected]


def test_unknown_aggregation_mode_lists_the_modes():
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum"):
        agg_loss(LOSS_2x4, MASK_2x4, "mean", 5.0)


def test_a_step_with_no_action_tokens_is_an_error():
    with pytest.raises(ValueError, match="no action tokens"):
        step_denominator([torch.zeros(2, 3)], "token-mean")
    with pytest.raises(ValueError, match="denominator"):
        agg_loss(LOSS_2x4, MASK_2x4, "token-mean", 0.0)


# ---- KL placement -------------------------------------------------------------------------------

def test_k1_is_refused_as_a_loss_term():
    with pytest.raises(ValueError, match="algorithm.kl.estimator='k1'.*zero\\s+expectation"):
        validate_kl_placement("loss", "k1", "grpo")


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_kl_in_reward_is_refused_for_outcome_only_estimators(advantage):
    with pytest.raises(ValueError, match=f"algorithm.kl.placement='reward'.*{advantage!r}"):
        validate_kl_placement("reward", "k3", advantage)


def test_unknown_placement_and_estimator_name_their_keys():
    with pytest.raises(ValueError, match="algorithm.kl.placement='both'.*reward, loss, none"):
        validate_kl_placement("both", "k3", "gae")
    with pytest.raises(ValueError, match="algorithm.kl.estimator='k5'.*k1, k2, k3"):
        validate_kl_placement("loss", "k5", "gae")


@pytest.mark.parametrize("placement, kind, advantage", [
    ("reward", "k1", "gae"), ("reward", "k3", "reinforce_pp"), ("loss", "k3", "grpo"),
    ("loss", "k2", "gae"), ("none", "k1", "grpo"),
])
def test_sound_kl_placements_pass(placement, kind, advantage):
    validate_kl_placement(placement, kind, advantage)


def test_log_ratio_is_clamped_so_the_loss_stays_finite():
    loss, _ = policy_loss(torch.tensor([[500.0]]), torch.zeros(1, 1), torch.tensor([[-1.0]]))
    assert math.isfinite(loss.item())
