"""KL estimators k1/k2/k3 and the fixed and adaptive KL controllers."""

import math

import pytest
import torch

from agents.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_estimate


def test_k1_k2_k3_match_hand_values():
    logp = torch.tensor([[0.0, -1.0, math.log(2.0)]])
    ref = torch.zeros(1, 3)
    # x = logp - ref = [0, -1, ln 2]
    assert torch.allclose(kl_estimate(logp, ref, "k1"), torch.tensor([[0.0, -1.0, math.log(2.0)]]))
    assert torch.allclose(kl_estimate(logp, ref, "k2"), torch.tensor([[0.0, 0.5, math.log(2.0) ** 2 / 2]]))
    # k3 = exp(-x) - 1 + x: [1 - 1 + 0, e - 1 - 1, 1/2 - 1 + ln 2]
    expected_k3 = torch.tensor([[0.0, math.e - 2.0, math.log(2.0) - 0.5]])
    assert torch.allclose(kl_estimate(logp, ref, "k3"), expected_k3)


def test_k3_is_nonnegative_and_finite_even_for_extreme_log_ratios():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(8, 16, generator=gen) * 5
    ref = torch.randn(8, 16, generator=gen) * 5
    logp[0, :3] = torch.tensor([1000.0, -1000.0, 25.0])  # far past the clamp: exp would overflow
    k3 = kl_estimate(logp, ref, "k3")
    assert torch.isfinite(k3).all()
    assert (k3 >= 0).all()


def test_k1_and_k3_are_unbiased_for_kl_under_policy_samples():
    # Exact expectation over a categorical support: E_{y~p}[k(y)] = sum_y p(y) k(y) = KL(p || q).
    logp = torch.log_softmax(torch.tensor([1.0, 0.0, -2.0, 0.5]), dim=0)
    ref = torch.log_softmax(torch.tensor([0.0, 1.0, 0.0, -1.0]), dim=0)
    true_kl = (logp.exp() * (logp - ref)).sum()
    for kind in ("k1", "k3"):
        expectation = (logp.exp() * kl_estimate(logp, ref, kind)).sum()
        assert torch.allclose(expectation, true_kl, atol=1e-6), kind


def test_unknown_estimator_lists_known_kinds():
    with pytest.raises(ValueError, match="k1, k2, k3") as err:
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), "k4")
    assert "'k4'" in str(err.value)
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=64)
    assert ctl.value == 0.05


def test_adaptive_controller_follows_ziegler_rule():
    ctl = AdaptiveKLController(init_beta=0.1, target=1.0, horizon=10)
    ctl.update(current_kl=1.1, n_steps=2)  # error 0.1 -> beta *= 1 + 0.1 * 2 / 10
    assert ctl.value == pytest.approx(0.102)


def test_adaptive_controller_raises_beta_above_target_and_lowers_it_below():
    up, down = AdaptiveKLController(0.1, 1.0, 100), AdaptiveKLController(0.1, 1.0, 100)
    up.update(current_kl=1.5, n_steps=10)
    down.update(current_kl=0.5, n_steps=10)
    assert up.value > 0.1 > down.value


def test_adaptive_controller_step_is_clipped_to_twenty_percent_per_horizon():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10)
    ctl.update(current_kl=50.0, n_steps=10)  # error 49 clipped to 0.2
    assert ctl.value == pytest.approx(0.12)


def test_controller_state_round_trips():
    ctl = AdaptiveKLController(0.1, 1.0, 10)
    ctl.update(current_kl=3.0, n_steps=5)
    fresh = AdaptiveKLController(0.5, 1.0, 10)
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.value == ctl.value
    fixed = FixedKLController(0.0)
    fixed.load_state_dict(FixedKLController(0.3).state_dict())
    assert fixed.value == 0.3


@pytest.mark.parametrize("kwargs, field", [
    ({"init_beta": -0.1, "target": 1.0, "horizon": 10}, "init_beta"),
    ({"init_beta": 0.1, "target": 0.0, "horizon": 10}, "target"),
    ({"init_beta": 0.1, "target": 1.0, "horizon": 0}, "horizon"),
])
def test_adaptive_controller_rejects_bad_settings_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaptiveKLController(**kwargs)
