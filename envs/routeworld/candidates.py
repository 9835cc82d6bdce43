"""RouteWorld's simulated candidates: how each one answers a question about the world, how long its
reply is, and the pool serving them."""

from __future__ import annotations

import hashlib
import re
import struct
from typing import Any, Callable

from envs.candidates.pool import CandidatePool
from envs.candidates.simulated import SimulatedBackend
from envs.candidates.spec import CandidateSpec, Request
from envs.chunks import UNKNOWN
from envs.routeworld.config import CandidateProfile
from envs.routeworld.world import Query, World, query_key


def success_probability(profile: CandidateProfile, query: Query) -> float:
    """P(the reply names the right answer): the domain skill for one hop; for a whole two-hop question
    `whole_factor` times the product of the hop skills when every hop is a specialty, else 0."""
    if len(query.relations) == 1:
        return profile.skill(query.domains[0])
    if profile.specialties is not None and not set(query.domains) <= set(profile.specialties):
        return 0.0
    p = profile.whole_factor
    for d in query.domains:
        p *= profile.skill(d)
    return p


def reply_text(profile: CandidateProfile, answer: str) -> str:
    """The reply naming `answer`: `prefix + answer + "."`, then the candidate's padding words."""
    return f"{profile.prefix}{answer}." + (f" {profile.padding}" if profile.padding else "")


def reply_tokens(text: str) -> int:
    """The length model: one completion token per whitespace-separated word, plus one end token."""
    return len(text.split()) + 1


def extract_reply_answer(reply: str) -> str:
    """The short answer a reply names: the text after the last "answer is" (if any) up to the next
    period, else the reply's first sentence; stripped. A reply with no text gives "unknown"."""
    m = list(re.finditer(r"answer is\s+", reply, flags=re.IGNORECASE))
    rest = reply[m[-1].end():] if m else reply
    answer = rest.split(".", 1)[0].strip()
    return answer or UNKNOWN


def _uniforms(seed: int, candidate: str, key: str, n: int = 3) -> list[float]:
    """`n` uniforms in [0, 1) that depend only on (seed, candidate, normalized query), via blake2b."""
    digest = hashlib.blake2b(f"{seed}\x1f{candidate}\x1f{key}".encode(), digest_size=8 * n).digest()
    return [v / 2.0**64 for v in struct.unpack(f"<{n}Q", digest)]


def wrong_answers(world: World, query: Query) -> list[str]:
    """The plausible wrong answers to `query`: other entities of the answer's kind, from either split.
    So a wrong reply during training may name a test entity (every name is then seen as a token a
    policy copies), while no training question asks about a test entity or states a fact of one."""
    return [e for e in world.entities_of(query.answer_kind) if e != query.answer]


def answer_query(world: World, profile: CandidateProfile, text: str) -> str:
    """The candidate's reply to a question text. Unrecognised questions get "unknown". Otherwise,
    with uniforms (u, v, w) from (world seed, candidate, normalized question): right if
    u < success_probability; else "unknown" if v < unknown_rate; else the wrong answer w picks."""
    query = world.lookup(text)
    if query is None:
        return reply_text(profile, UNKNOWN)
    u, v, w = _uniforms(world.seed, profile.name, query_key(text))
    if u < success_probability(profile, query):
        return reply_text(profile, query.answer)
    wrong = wrong_answers(world, query)
    if v < profile.unknown_rate or not wrong:
        return reply_text(profile, UNKNOWN)
    return reply_text(profile, wrong[int(w * len(wrong))])


def expected_reply_tokens(world: World, profile: CandidateProfile, query: Query) -> float:
    """E[completion tokens] of the candidate's reply to `query` under the length model, averaging
    over right, "unknown" and (uniformly chosen) wrong replies."""
    p = success_probability(profile, query)
    wrong = wrong_answers(world, query)
    unknown = reply_tokens(reply_text(profile, UNKNOWN))
    if wrong:
        wrong_tokens = sum(reply_tokens(reply_text(profile, e)) for e in wrong) / len(wrong)
        miss = profile.unknown_rate * unknown + (1 - profile.unknown_rate) * wrong_tokens
    else:
        miss = unknown
    return p * reply_tokens(reply_text(profile, query.answer)) + (1 - p) * miss


Responder = Callable[[Request], "tuple[str, int]"]


def make_responder(world: World, profile: CandidateProfile) -> Responder:
    """A `SimulatedBackend` responder: answers `request.query`, returns (text, completion_tokens)."""
    def respond(request: Request) -> tuple[str, int]:
        text = answer_query(world, profile, request.query)
        return text, reply_tokens(text)
    return respond


def candidate_spec(profile: CandidateProfile) -> CandidateSpec:
    return CandidateSpec(name=profile.name, model=profile.model, params_b=profile.params_b,
                         price_per_1m_output=profile.price_per_1m_output, description=profile.description)


def routeworld_candidates(world: World) -> tuple[list[CandidateSpec], dict[str, Responder]]:
    """The specs of the world's candidates (what the prompt shows) and their responders by name."""
    profiles = world.config.candidates
    return [candidate_spec(p) for p in profiles], {p.name: make_responder(world, p) for p in profiles}


def routeworld_pool(world: World, **pool_kwargs: Any) -> CandidatePool:
    """A `CandidatePool` of the world's candidates on a simulated backend (`pool_kwargs` go to it)."""
    specs, responders = routeworld_candidates(world)
    return CandidatePool(specs, SimulatedBackend(responders), **pool_kwargs)


def profile_by_name(world: World, name: str) -> CandidateProfile:
    for p in world.config.candidates:
        if p.name.casefold() == name.casefold():
            return p
    raise KeyError(f"no candidate {name!r} in this world; known: {[p.name for p in world.config.candidates]}")
