"""Config validation: every bad key, type or range stops the run before any model loads."""

import pytest

from agents.config import TrainConfig, apply_override, load_config, redacted


def test_defaults_validate():
    assert isinstance(load_config(None), TrainConfig)


@pytest.mark.parametrize("override, key", [
    ("episode.alpha=1.5", "alpha"),
    ("episode.alpha={sample: []}", r"episode\.alpha\.sample=\[\] must be a non-empty list"),
    ("episode.alpha={sample: [0, 1.2]}", r"episode\.alpha\.sample\[1\]=1\.2 must lie in \[0, 1\]"),
    ("episode.alpha={low: 0.8, high: 0.2}", "episode.alpha: low=0.8 is above high=0.2"),
    ("episode.alpha={lo: 0, hi: 1}", "episode.alpha="),
    ("episode.max_cost=0", r"episode\.max_cost=0(\.0)? must be > 0"),
    ("episode.max_cost=-5", r"episode\.max_cost=-5(\.0)? must be > 0"),
    ("episode.max_cost={low: 50, high: 5}", "episode.max_cost: low=50 is above high=5"),
    ("episode.max_cost={sample: []}", r"episode\.max_cost\.sample"),
    ("episode.max_cost={low: 20, high: .inf}", r"episode\.max_cost\.high=inf must be a number"),
    ("episode.max_cost={sample: [.nan, 40]}", r"episode\.max_cost\.sample\[0\]=nan must be a number"),
    ("episode.max_cost=-.inf", r"episode\.max_cost=-inf must be a number"),
    ("episode.alpha={sample: [.inf]}", r"episode\.alpha\.sample\[0\]=inf must be a number"),
    ("report_alphas=[0.5]", "report_alphas.*needs a conditioned policy"),
    ("episode.alpha={sample: [0, 0.5]}", "report_alphas must list"),
    ("algorithm.lam=-1", "algorithm.lam"),
    ("algorithm.gamma=2", "algorithm.gamma"),
    ("algorithm.loss_agg=mean", "algorithm.loss_agg"),
    ("algorithm.advantage=ppo2", "ppo2"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.engine_attention=flash", "rollout.engine_attention"),
    ("model.dtype=int8", "model.dtype"),
    ("deepspeed=zero4", "zero4"),
    ("deepspeed=/no/such/ds.json", "/no/such/ds.json"),
    ("optim.grad_clip=-1", "optim.grad_clip"),  # would flip the gradients' sign
    ("optim.grad_clip=0", "optim.grad_clip"),  # would zero them
    ("log_every=0", "log_every"),
    ("sft.batch_size=0", "sft.batch_size"),
    ("cost.normalizer=bogus", "bogus"),
    ("cost.options={bogus: 1}", "cost.options"),
    ("reward_fn=nope:fn", "reward_fn='nope:fn'"),
    ("model.init={hiden_size: 64}", "hiden_size"),
    ("calls.abort_rate=0", "calls.abort_rate"),
])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        load_config(None, [override])


def test_unknown_key_is_an_error_listing_allowed_keys():
    with pytest.raises(ValueError, match=r"algorithm.clip_epsilon.*clip_eps"):
        load_config(None, ["algorithm.clip_epsilon=0.1"])


def test_wrong_type_names_the_key():
    with pytest.raises((TypeError, ValueError), match="rollout.n_prompts"):
        load_config(None, ["rollout.n_prompts=many"])


def test_grpo_needs_groups_and_kl_in_loss():
    with pytest.raises(ValueError, match="n_per_prompt"):
        load_config(None, ["algorithm.advantage=grpo", "algorithm.kl.placement=loss", "algorithm.kl.estimator=k3"])
    with pytest.raises(ValueError, match="algorithm.kl.placement"):
        load_config(None, ["algorithm.advantage=grpo", "rollout.n_per_prompt=4"])
    load_config(None, ["algorithm.advantage=grpo", "rollout.n_per_prompt=4", "algorithm.kl.placement=loss",
                       "algorithm.kl.estimator=k3"])


def test_k1_as_a_loss_term_is_refused():
    with pytest.raises(ValueError, match="k1"):
        load_config(None, ["algorithm.kl.placement=loss", "algorithm.kl.estimator=k1"])


def test_overrides_parse_yaml_values():
    data = {}
    apply_override(data, "optim.actor_lr=1e-6")
    apply_override(data, "sft.enabled=true")
    apply_override(data, "algorithm.dual_clip=null")
    assert data == {"optim": {"actor_lr": 1e-6}, "sft": {"enabled": True}, "algorithm": {"dual_clip": None}}


def test_shipped_configs_validate():
    from pathlib import Path
    for path in sorted(Path("configs").glob("*.yaml")):
        load_config(path)


def test_redaction_hides_secret_values_but_keeps_env_var_names():
    from agents.config import redact
    out = redact({"backend": {"api_key": "sk-123", "api_key_env": "ROUTER_API_KEY", "n": 3}, "l": [{"token": "t"}]})
    assert out == {"backend": {"api_key": "<redacted>", "api_key_env": "ROUTER_API_KEY", "n": 3},
                   "l": [{"token": "<redacted>"}]}
    assert redacted(load_config(None))["task"]["name"] == "routeworld"


def test_extends_merges_over_the_parent(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 3\nepisode: {alpha: 0.2, max_turns: 2}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nepisode: {alpha: 0.9}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.seed, cfg.episode.alpha, cfg.episode.max_turns) == (3, 0.9, 2)


def test_flex_attention_is_accepted_and_falls_back_to_sdpa_on_cpu():
    import torch

    from agents.policy import attn_implementation
    cfg = load_config(None, ["model.attn_implementation=flex_attention", "rollout.pack_sequences=true"])
    assert cfg.model.attn_implementation == "flex_attention" and cfg.rollout.pack_sequences
    assert attn_implementation("flex_attention", torch.device("cpu")) == "sdpa"
    assert attn_implementation("flex_attention", torch.device("cuda")) == "flex_attention"
