"""Baseline routers and LLM routers by name: `make_router("knn", ctx)`, `make_router("fixed:Name", ctx)`,
`make_router("policy:runs/x/checkpoints/best/policy", ctx)`. Every router acts in the env."""

from __future__ import annotations

from agents.routers.base import RouterContext, RouterOptions, RouterSetting, ScriptedRouter, SingleCallRouter
from agents.routers.cascade import CascadeRouter
from agents.routers.ensemble import EnsembleRouter
from agents.routers.fixed import CheapestRouter, FixedRouter, LargestRouter, RandomRouter
from agents.routers.knn import KNNRouter
from agents.routers.llm import DirectRouter, LLMRouter, PolicyRouter, PromptLLMRouter
from agents.routers.mf import MFRouter
from agents.routers.mlp import MLPRouter
from agents.routers.oracle import OracleRouter
from agents.routers.regroup import RegroupRouter

ROUTERS: dict[str, type] = {}
NEEDS_ARG = ("fixed", "policy", "prompt-llm", "direct")  # routers written `name:argument`


def register_router(cls: type) -> type:
    """Register a router class under `cls.name`; a taken name is an error."""
    if not cls.name or cls.name in ROUTERS:
        raise ValueError(f"router name {cls.name!r} is empty or already registered")
    ROUTERS[cls.name] = cls
    return cls


for _cls in (LargestRouter, CheapestRouter, RandomRouter, FixedRouter, OracleRouter, KNNRouter, MLPRouter,
             MFRouter, CascadeRouter, RegroupRouter, EnsembleRouter, PolicyRouter, PromptLLMRouter, DirectRouter):
    register_router(_cls)


def parse_router_spec(spec: str) -> tuple[str, str | None]:
    """`name` or `name:argument` (split at the first colon) -> (name, argument or None), checked
    against the registry: an unknown name lists the known ones."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"router spec must be a non-empty string, got {spec!r}")
    name, _, arg = spec.strip().partition(":")
    name, arg = name.strip(), arg.strip() or None
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r} (in {spec!r}); known: {', '.join(sorted(ROUTERS))}")
    if name in NEEDS_ARG and arg is None:
        raise ValueError(f"router {name!r} needs an argument: {name}:<{'candidate' if name == 'fixed' else 'model dir'}>")
    if name not in NEEDS_ARG and arg is not None:
        raise ValueError(f"router {name!r} takes no argument, got {spec!r}")
    return name, arg


def make_router(spec: str, ctx: RouterContext):
    """The router a spec names, built over `ctx` (not yet fitted)."""
    name, arg = parse_router_spec(spec)
    return ROUTERS[name](ctx, arg)


__all__ = ["ROUTERS", "NEEDS_ARG", "register_router", "parse_router_spec", "make_router", "RouterContext",
           "RouterOptions", "RouterSetting", "ScriptedRouter", "SingleCallRouter", "LLMRouter"]
