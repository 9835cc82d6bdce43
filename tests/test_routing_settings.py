"""The routing settings saved beside a policy: they round-trip, refuse a different pool naming the
difference, warn outside the trained range, name the file and key when broken, and are derived from
an older checkpoint's config.yaml."""

import json
import math
import warnings

import pytest
import yaml

from agents.routing_settings import (RoutingRangeWarning, RoutingSettings, load_routing_settings,
                                     save_routing_settings)
from envs.candidates.spec import CandidateSpec
from envs.episode import EpisodeConfig

SPECS = [CandidateSpec("Cheap", "org/cheap", 1, 0.2), CandidateSpec("Big", "org/big", 70, 3.0, 0.5)]


def settings(**episode) -> RoutingSettings:
    return RoutingSettings.from_episode(EpisodeConfig(prompt_template="compact", max_turns=3, **episode), SPECS)


def test_settings_round_trip_through_routing_json(tmp_path):
    saved = settings(alpha={"sample": [0, 0.5, 0.8]}, max_cost={"low": 5, "high": 50})
    path = save_routing_settings(tmp_path, saved)
    assert path == tmp_path / "routing.json"
    assert load_routing_settings(tmp_path) == saved
    assert saved.is_conditioned and not settings(alpha=0.3).is_conditioned


def test_episode_config_plays_a_conditioned_policy_at_one_alpha_with_the_prompt_stating_it():
    cfg = settings(alpha={"low": 0.0, "high": 0.9}).episode_config(alpha=0.5)
    assert cfg.alpha == {"sample": [0.5]} and cfg.conditioned  # still stated in the prompt
    assert (cfg.prompt_template, cfg.max_turns) == ("compact", 3)
    assert settings(alpha=0.2).episode_config().alpha == 0.2


@pytest.mark.parametrize("specs,words", [
    (SPECS[:1], ["missing ['Big']"]),
    (SPECS + [CandidateSpec("New", "org/new", 1, 0.1)], ["not trained with ['New']"]),
    ([SPECS[0], CandidateSpec("Big", "org/big", 70, 2.0, 0.5)], ["Big.price_per_1m_output 3 -> 2"]),
    ([SPECS[0], CandidateSpec("Big", "org/big", 70, 3.0, 0.0)], ["Big.price_per_1m_input 0.5 -> 0"]),
    (SPECS[::-1], ["order"]),
])
def test_a_different_pool_is_refused_naming_the_difference(specs, words):
    with pytest.raises(ValueError, match="differs") as e:
        settings().check_pool(specs)
    for w in words:
        assert w in str(e.value)


def test_the_trained_pool_passes():
    settings().check_pool(SPECS)  # raises on any difference


def test_alpha_and_cap_outside_the_trained_range_warn_naming_the_range():
    s = settings(alpha={"low": 0.1, "high": 0.6}, max_cost={"sample": [10, 20]})
    with pytest.warns(RoutingRangeWarning, match=r"\[0.1, 0.6\]"):
        s.check_alpha(0.8)
    with pytest.warns(RoutingRangeWarning, match=r"\{10, 20\}"):
        s.check_max_cost(15)
    with pytest.warns(RoutingRangeWarning, match="no cap"):
        settings().check_max_cost(40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inside the range: silent
        s.check_alpha(0.35)
        s.check_max_cost(20)
    with pytest.raises(ValueError, match="alpha"):
        s.check_alpha(1.5)
    with pytest.raises(ValueError, match="max_cost"):
        s.check_max_cost(0)



def test_a_policy_trained_with_and_without_a_cap_takes_either_silently():
    s = settings(max_cost={"sample": [math.inf, 40.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.check_max_cost(None), s.check_max_cost(math.inf), s.check_max_cost(40)
    with pytest.warns(RoutingRangeWarning, match=r"\{no cap, 40\}"):
        s.check_max_cost(20)
    with pytest.warns(RoutingRangeWarning, match="max_cost=no cap"):
        settings(max_cost={"sample": [40.0]}).check_max_cost(math.inf)


@pytest.mark.parametrize("content,words", [
    ("{not json", "not valid JSON"),
    ('{"alpha": 0.2, "colour": 1}', "unknown key(s) ['colour']"),
    ('{"alpha": 2}', "alpha=2 must lie in [0, 1]"),
    ('{"candidates": [{"name": "A"}]}', "candidates[0]"),
])
def test_a_broken_routing_json_names_the_file_and_the_key(tmp_path, content, words):
    (tmp_path / "routing.json").write_text(content)
    with pytest.raises(ValueError) as e:
        load_routing_settings(tmp_path)
    assert str(tmp_path / "routing.json") in str(e.value) and words in str(e.value)


def test_an_older_checkpoint_is_read_from_its_config_yaml(tmp_path):
    policy = tmp_path / "best" / "policy"
    policy.mkdir(parents=True)
    config = {"seed": 0, "task": {"name": "routeworld", "world": {"seed": 3}},
              "episode": {"alpha": 0.8, "max_turns": 2, "prompt_template": "compact"}}
    (tmp_path / "best" / "config.yaml").write_text(yaml.safe_dump(config))
    s = load_routing_settings(policy)
    assert (s.alpha, s.max_turns, s.prompt_template) == (0.8, 2, "compact")
    assert [c["name"] for c in s.candidates] == ["Geo-Expert", "People-Expert", "Generalist-XL", "Tiny-LM"]
    assert s.candidates[2]["price_per_1m_output"] == 3.0


def test_a_policy_without_settings_or_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="routing.json not found"):
        load_routing_settings(tmp_path / "policy")


def test_saved_settings_are_plain_json(tmp_path):
    save_routing_settings(tmp_path, settings(max_cost=25.0))
    data = json.loads((tmp_path / "routing.json").read_text())
    assert data["max_cost"] == 25.0 and data["candidates"][1]["price_per_1m_input"] == 0.5
