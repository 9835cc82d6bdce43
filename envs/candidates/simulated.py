"""Simulated candidates: each candidate is a Python callable that answers a sub-query.

They are real backends for offline work (tests, the RouteWorld task), not stand-ins for the HTTP
path. A responder gets the `Request` and returns the reply text, or `(text, completion_tokens)`.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Mapping, Sequence

from envs.candidates.pool import register_backend
from envs.candidates.spec import CandidateSpec, Completion, Request

Responder = Callable[[Request], "str | tuple[str, int]"]


class SimulatedBackend:
    """Routes each request to the responder registered under the candidate's name, after
    `latency_s` seconds (a number, or a function of the request) spent awaiting, as an API call would."""

    def __init__(self, responders: Mapping[str, Responder], latency_s: float | Callable[[Request], float] = 0.0):
        self.responders = dict(responders)
        self.latency_s = latency_s

    async def complete(self, request: Request) -> Completion:
        responder = self.responders.get(request.spec.name)
        if responder is None:
            raise KeyError(f"no simulated responder for candidate {request.spec.name!r}")
        delay = self.latency_s(request) if callable(self.latency_s) else self.latency_s
        if delay > 0:
            await asyncio.sleep(delay)
        out = responder(request)
        if isinstance(out, tuple):
            text, completion_tokens = out
            return Completion(text, completion_tokens=int(completion_tokens))
        return Completion(out)


def echo_responder(prefix: str) -> Responder:
    """A deterministic responder that answers `<prefix> <query>`: handy for tests and examples."""
    return lambda request: f"{prefix} {request.query}"


@register_backend("simulated")
def _make_simulated(specs: Sequence[CandidateSpec], responders: Mapping[str, Responder] | None = None) -> SimulatedBackend:
    return SimulatedBackend(responders or {s.name: echo_responder(f"[{s.name}]") for s in specs})
