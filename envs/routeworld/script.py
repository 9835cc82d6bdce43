"""Scripted RouteWorld agents for the supervised warm start: short formulaic thoughts, one call per hop
(or the whole question), and an answer copied from the last reply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from envs.candidates.pool import CandidatePool
from envs.candidates.spec import CallRecord
from envs.chunks import UNKNOWN, answer_chunk, call_chunk
from envs.prompts import condition_text
from envs.routeworld.candidates import extract_reply_answer
from envs.routeworld.oracle import oracle_plan
from envs.routeworld.world import RELATIONS, World
from rewards.answer import normalize_answer
from rewards.cost import CostNormalizer
from rewards.tags import ANSWER, SEARCH, info_block, parse_call, split_blocks

POLICIES = ("random", "oracle")
# How a scripted thought names a sub-question's domain, as a person reading it would
# ("need the country of X, a geography question"); the prompt describes each candidate's topics.
DOMAIN_WORDS = {"geo": "geography", "people": "people", "business": "business"}


def hop_thought(relation: str, subject: str, alpha: float | None = None) -> str:
    """The thought before a hop's call: what is needed, the kind of question it is and, in an episode
    whose prompt states a cost weight, that weight in the prompt's words ("... a geography question.
    Cost weight: 0.8."), so the choice that follows reads both from the thought just written."""
    rel = RELATIONS[relation]
    thought = f"need {rel.phrase.format(subject)}, a {DOMAIN_WORDS[rel.domain]} question"
    return thought if alpha is None else f"{thought}. {condition_text(alpha).strip()}"


def scripted_turn(
    example: Mapping,
    replies_so_far: Sequence[str],
    rng: np.random.Generator,
    candidate_names: Sequence[str],
    policy: str = "random",
    *,
    world: World | None = None,
    alpha: float = 0.0,
    cost_normalizer: CostNormalizer | None = None,
    max_turns: int = 4,
) -> str:
    """The next chunk of policy text for a RouteWorld question (`example` from `World.questions`).

    Rule: once a reply says "unknown", or every hop (or the whole question) has been asked, or
    `max_turns` calls were made, answer with the entity extracted from the last reply
    ("<think> the answer is X </think>\\n<answer> X </answer>"). Otherwise ask the next hop,
    naming the entity the previous reply gave ("<think> need the country of X, a geography question </think>\\n
    <search> Name: In which country is X? </search>"); an example with its own `alpha` (a conditioned
    episode's) also states it in that thought. "random" sends each hop to a uniformly random
    candidate of `candidate_names` (drawn from `rng`); "oracle" follows `oracle_plan` at `alpha`
    (needs `world`), asking a two-hop question whole when that plan does.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown scripted policy {policy!r}; known: {POLICIES}")
    hops, n = example["hops"], len(replies_so_far)
    last = extract_reply_answer(replies_so_far[-1]) if n else None
    if last is not None and normalize_answer(last) == UNKNOWN:
        return answer_chunk(UNKNOWN)
    if policy == "oracle":
        if world is None:
            raise ValueError("the oracle scripted policy needs world=...")
        plan = oracle_plan(world, example, candidate_names, alpha, cost_normalizer, max_turns)
        if len(plan.calls) < len(hops):  # the whole question, one call
            return call_chunk("ask the whole question", *plan.calls[0]) if n == 0 else answer_chunk(last)
        names = [name for name, _ in plan.calls]
    if n >= min(len(hops), max_turns):
        return answer_chunk(last if last is not None else UNKNOWN)
    relation = RELATIONS[hops[n]["relation"]]
    subject = hops[0]["subject"] if n == 0 else last
    name = names[n] if policy == "oracle" else candidate_names[int(rng.integers(len(candidate_names)))]
    thought = hop_thought(hops[n]["relation"], subject, example.get("alpha"))
    return call_chunk(thought, name, relation.ask.format(subject))


@dataclass
class ScriptedTrajectory:
    """One scripted episode: the text after the prompt (policy chunks and inserted `<info>` blocks),
    the chunks, the candidates' replies and the pool's call records."""

    text: str = ""
    chunks: list[str] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    records: list[CallRecord] = field(default_factory=list)

    @property
    def answer(self) -> str:
        return split_blocks(self.chunks[-1])[-1].content.strip()

    @property
    def cost(self) -> float:
        return sum(r.cost for r in self.records)


def scripted_trajectory(
    example: Mapping,
    pool: CandidatePool,
    rng: np.random.Generator,
    policy: str = "random",
    max_turns: int = 4,
    **policy_kwargs,
) -> ScriptedTrajectory:
    """Play `scripted_turn` against `pool` as the env would: each `<search>` is sent to the pool and
    its reply inserted with `info_block`, until the `<answer>` chunk."""
    out = ScriptedTrajectory()
    for _ in range(max_turns + 1):
        chunk = scripted_turn(example, out.replies, rng, pool.names, policy, max_turns=max_turns,
                              **policy_kwargs)
        out.chunks.append(chunk)
        out.text += chunk
        last = split_blocks(chunk)[-1]
        if last.tag == ANSWER:
            return out
        if last.tag != SEARCH:
            raise RuntimeError(f"a scripted chunk ends with <{last.tag}>: {chunk!r}")
        call = parse_call(last.content, pool.names)
        record = pool.call(call.name, call.query, example["question"])
        reply = f"error: {record.error}" if record.error else record.reply
        out.records.append(record)
        out.replies.append(reply)
        out.text += info_block(reply)
    raise RuntimeError(f"scripted agent did not answer within {max_turns} calls")
