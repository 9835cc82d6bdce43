"""The routing settings a policy was trained with, saved beside its weights (`policy/routing.json`) so
that evaluate.py and the server play it as it was trained: the cost weight (or the range it was
trained across), the spending cap, the prompt template, the turn and token limits, and the
candidates with their prices."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from agents.config import TaskConfig, from_dict
from envs.atomic import write_text_atomic
from envs.candidates.spec import CandidateSpec
from envs.conditioning import as_cap, check_spec, in_range, is_sample_set, is_sampled, spec_range
from envs.episode import EpisodeConfig

ROUTING_FILE = "routing.json"
PRICE_KEYS = ("price_per_1m_input", "price_per_1m_output")


class RoutingRangeWarning(UserWarning):
    """An alpha or cap asked of a policy outside the range it was trained across."""


def _describe(spec: Any) -> str:
    if spec is None or spec == math.inf:
        return "no cap"
    if is_sample_set(spec):
        return "the set {" + ", ".join("no cap" if math.isinf(v) else f"{v:g}" for v in spec["sample"]) + "}"
    low, high = spec_range(spec)
    return f"the range [{low:g}, {high:g}]" if low != high else f"{low:g} only"


@dataclass
class RoutingSettings:
    """What a trained policy needs to be played as it was trained (see the module docstring)."""

    alpha: float | dict = 0.0  # a number, or {sample: [...]} / {low: .., high: ..} for a conditioned policy
    max_cost: float | dict | None = None  # micro-dollars per question (None: trained without a cap)
    prompt_template: str = "router_r1"
    max_turns: int = 4
    max_response_tokens: int = 512
    max_info_tokens: int = 256
    candidates: list[dict] = field(default_factory=list)  # CandidateSpec fields: name, model, params_b, prices, ...
    min_reply_tokens: int = 4
    metric: str = "em"

    def __post_init__(self) -> None:
        check_spec("alpha", self.alpha, unit=True)
        if self.max_cost is not None:
            check_spec("max_cost", self.max_cost, unit=False)
        for i, c in enumerate(self.candidates):
            if not isinstance(c, dict) or "name" not in c or any(k not in c for k in PRICE_KEYS):
                raise ValueError(f"candidates[{i}]={c!r} needs name, {' and '.join(PRICE_KEYS)}")

    @classmethod
    def from_episode(cls, episode: EpisodeConfig, specs: Sequence[CandidateSpec]) -> "RoutingSettings":
        """The settings of a run: its episode config and its pool's candidate specs."""
        return cls(alpha=episode.alpha, max_cost=episode.max_cost, prompt_template=episode.prompt_template,
                   max_turns=episode.max_turns, max_response_tokens=episode.max_response_tokens,
                   max_info_tokens=episode.max_info_tokens, min_reply_tokens=episode.min_reply_tokens,
                   metric=episode.metric, candidates=[dataclasses.asdict(s) for s in specs])

    @property
    def is_conditioned(self) -> bool:
        """The policy was trained across alphas (sampled per question), so any alpha in the range is
        asked for in the prompt."""
        return is_sampled(self.alpha)

    def episode_config(self, alpha: float | None = None, max_cost: float | None = None) -> EpisodeConfig:
        """The env settings that play this policy as trained; `alpha` and `max_cost` pin one point
        (warning when outside the trained range)."""
        cfg = EpisodeConfig(max_turns=self.max_turns, max_response_tokens=self.max_response_tokens,
                            max_info_tokens=self.max_info_tokens, alpha=self.alpha, max_cost=self.max_cost,
                            min_reply_tokens=self.min_reply_tokens, metric=self.metric,
                            prompt_template=self.prompt_template)
        if alpha is not None:
            self.check_alpha(alpha)
        if max_cost is not None:
            self.check_max_cost(max_cost)
        return cfg.pinned(alpha, max_cost)

    def check_pool(self, specs: Sequence[CandidateSpec]) -> None:
        """Refuse a pool whose candidates differ from the trained ones: names (and their order, which
        the prompt shows) and prices. The message names every difference."""
        trained = {c["name"]: c for c in self.candidates}
        given = {s.name: s for s in specs}
        diffs = []
        if set(trained) - set(given):
            diffs.append(f"missing {sorted(set(trained) - set(given))}")
        if set(given) - set(trained):
            diffs.append(f"not trained with {sorted(set(given) - set(trained))}")
        for name in [n for n in trained if n in given]:
            for key in PRICE_KEYS:
                was, now = float(trained[name][key]), float(getattr(given[name], key))
                if was != now:
                    diffs.append(f"{name}.{key} {was:g} -> {now:g}")
        if not diffs and [c["name"] for c in self.candidates] != [s.name for s in specs]:
            diffs.append(f"order {[c['name'] for c in self.candidates]} -> {[s.name for s in specs]}")
        if diffs:
            raise ValueError("the candidate pool differs from the one the policy was trained with: "
                             + "; ".join(diffs))

    def check_alpha(self, alpha: float) -> None:
        """Refuse an alpha outside [0, 1]; warn when it lies outside what the policy was trained on."""
        check_spec("alpha", alpha, unit=True)
        if not in_range(self.alpha, alpha):
            warnings.warn(f"alpha={alpha:g} lies outside the trained alpha ({_describe(self.alpha)}); "
                          "the policy never saw it in training", RoutingRangeWarning, stacklevel=2)

    def check_max_cost(self, max_cost: float | None) -> None:
        """Refuse a cap <= 0; warn when a cap (or none) lies outside what the policy was trained on."""
        if max_cost is not None:
            check_spec("max_cost", max_cost, unit=False)
        cap, trained = as_cap(max_cost), self.max_cost  # infinity is no cap
        inside = (cap is None) if trained is None else in_range(trained, math.inf if cap is None else cap)
        if not inside:
            shown = "no cap" if cap is None else f"{cap:g}"
            warnings.warn(f"max_cost={shown} lies outside the trained max_cost ({_describe(trained)}); "
                          "the policy never saw it in training", RoutingRangeWarning, stacklevel=2)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def save_routing_settings(policy_dir: str | Path, settings: RoutingSettings) -> Path:
    """Write `policy_dir/routing.json` (temp file, then rename)."""
    return write_text_atomic(Path(policy_dir) / ROUTING_FILE, json.dumps(settings.as_dict(), indent=2) + "\n")


def load_routing_settings(policy_dir: str | Path) -> RoutingSettings:
    """The settings saved beside a policy's weights. A checkpoint from before routing.json existed is
    read from its `config.yaml` (train.py writes it beside `policy/`) when that is there; otherwise,
    or when a file is broken, a ValueError names the file and the key."""
    policy_dir = Path(policy_dir)
    path = policy_dir / ROUTING_FILE
    if not path.is_file():
        return _from_train_config(policy_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be an object of {_field_names()}")
    unknown = sorted(set(data) - set(_field_names()))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; allowed: {_field_names()}")
    try:
        return RoutingSettings(**data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(RoutingSettings)]


def _from_train_config(policy_dir: Path) -> RoutingSettings:
    """The settings of an older checkpoint, from the training config saved beside `policy/`: its
    episode settings and its task's candidates (RouteWorld's world, or a qa task's pool file)."""
    config = policy_dir.parent / "config.yaml"
    if not config.is_file():
        raise ValueError(f"{policy_dir / ROUTING_FILE} not found, and no {config} to derive it from; save the "
                         "policy with train.py (which writes routing.json) or write routing.json by hand")
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        episode = from_dict(EpisodeConfig, data.get("episode") or {}, "episode.")
        task = from_dict(TaskConfig, data.get("task") or {}, "task.")
    except (yaml.YAMLError, TypeError, ValueError) as e:
        raise ValueError(f"{config}: cannot derive the routing settings ({e})") from None
    if task.name == "routeworld":
        from envs.tasks import routeworld_world
        from envs.routeworld import routeworld_candidates
        specs, _ = routeworld_candidates(routeworld_world(task.world, task.world_preset))
    else:
        from envs.candidates.pool import load_pool
        if not task.pool or not Path(task.pool).is_file():
            raise ValueError(f"{config}: task.pool={task.pool!r} is not a file, so the candidates cannot be "
                             f"derived; write {policy_dir / ROUTING_FILE}")
        pool = load_pool(task.pool)
        specs = pool.specs
        pool.close()
    return RoutingSettings.from_episode(episode, specs)
