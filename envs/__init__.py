"""The environment: MultiRouteEnv (gymnasium), its batched form, prompts, candidates, data and the
offline RouteWorld task (the tag grammar is rewards/tags.py). Heavy modules load on first use, so
`import envs.prompts` stays light."""

import importlib

import gymnasium

_LAZY = {
    "MultiRouteEnv": "envs.env",
    "MultiRouteVectorEnv": "envs.vector",
    "EpisodeConfig": "envs.episode",
    "Episode": "envs.episode",
}

if "MultiRoute-v0" not in gymnasium.registry:
    gymnasium.register(id="MultiRoute-v0", entry_point="envs.env:MultiRouteEnv")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'envs' has no attribute {name!r}")
