"""Baseline routers and LLM routers by name: `make_router("knn", ctx)`, `make_router("fixed:Name", ctx)`,
`make_router("policy:runs/x/checkpoints/best/policy", ctx)`. Every router acts in the env. A router is
one class in one file, registered where it is defined with `@register_router(name, arg=...)`; importing
this package imports every such file."""

from __future__ import annotations

from agents.routers import cascade, ensemble, fixed, knn, llm, mf, mlp, oracle, regroup  # noqa: F401  (they register)
from agents.routers.base import (ROUTERS, RouterContext, RouterOptions, RouterSetting, ScriptedRouter,
                                 SingleCallRouter, register_router)
from agents.routers.llm import LLMRouter


def parse_router_spec(spec: str) -> tuple[str, str | None]:
    """`name` or `name:argument` (split at the first colon) -> (name, argument or None), checked
    against the registry: an unknown name lists the known ones."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"router spec must be a non-empty string, got {spec!r}")
    name, _, arg = spec.strip().partition(":")
    name, arg = name.strip(), arg.strip() or None
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r} (in {spec!r}); known: {', '.join(sorted(ROUTERS))}")
    wants = ROUTERS[name].arg
    if wants is not None and arg is None:
        raise ValueError(f"router {name!r} needs an argument: {name}:<{wants}>")
    if wants is None and arg is not None:
        raise ValueError(f"router {name!r} takes no argument, got {spec!r}")
    return name, arg


def make_router(spec: str, ctx: RouterContext):
    """The router a spec names, built over `ctx` (not yet fitted)."""
    name, arg = parse_router_spec(spec)
    return ROUTERS[name](ctx, arg)


__all__ = ["ROUTERS", "register_router", "parse_router_spec", "make_router", "RouterContext", "RouterOptions",
           "RouterSetting", "ScriptedRouter", "SingleCallRouter", "LLMRouter"]
