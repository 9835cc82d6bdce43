"""A small byte-level BPE tokenizer for RouteWorld, trained on the training split's texts only, with
every tag and candidate name as one token."""

from __future__ import annotations

from typing import Iterable, Iterator

from transformers import PreTrainedTokenizerFast

from envs.bpe import TAG_STRINGS, byte_level_bpe
from envs.chunks import UNKNOWN, answer_chunk, call_chunk
from envs.routeworld.candidates import reply_text
from envs.routeworld.script import hop_thought
from envs.routeworld.world import World
from rewards.tags import info_block


def world_texts(world: World) -> Iterator[str]:
    """Texts of the training split as the policy will see them: each question, and per hop every
    candidate's call, its right and "unknown" replies, and the answer chunks."""
    profiles = world.config.candidates
    for q in world.questions("train"):
        yield q["question"]
        for p in profiles:
            yield call_chunk("ask the whole question", p.name, q["question"])
        for hop in q["hops"]:
            thought = hop_thought(hop["relation"], hop["subject"])
            for p in profiles:
                yield call_chunk(thought, p.name, hop["sub_question"])
                yield info_block(reply_text(p, hop["answer"])) + info_block(reply_text(p, UNKNOWN))
            yield answer_chunk(hop["answer"])
        yield answer_chunk(UNKNOWN)


def make_world_tokenizer(
    world: World, extra_texts: Iterable[str] = (), vocab_size: int = 640, cues: Iterable[str] = ()
) -> PreTrainedTokenizerFast:
    """`byte_level_bpe` of `vocab_size` on `world_texts(world)` and `extra_texts` (e.g. the prompt), with
    the 8 tag strings, the candidate names, every entity name (of both splits) and each of `cues` (e.g.
    a conditioned prompt's "Cost weight: 0.5.") as single tokens.
    One token per name lets a tiny model learn to copy a name it has never seen asked about (a
    multi-token copy needs induction circuits that take far longer to train than the CPU budget
    allows); test names reach training only as wrong replies."""
    names = [p.name for p in world.config.candidates]
    entities = sorted({e for kind in world.entities for e in world.entities_of(kind)}, key=lambda e: (-len(e), e))
    return byte_level_bpe(list(world_texts(world)) + list(extra_texts), vocab_size,
                          TAG_STRINGS + tuple(names) + tuple(entities) + tuple(cues))
