"""A small byte-level BPE tokenizer for RouteWorld, trained on the training split's texts only, with
every tag and candidate name as one token."""

from __future__ import annotations

from typing import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from envs.routeworld.candidates import UNKNOWN, reply_text
from envs.routeworld.script import answer_chunk, call_chunk, info_block
from envs.routeworld.world import RELATIONS, World
from envs.tags import TAGS, close_tag, open_tag

PAD, EOS = "<|pad|>", "<|endoftext|>"
TAG_STRINGS = tuple(s for t in TAGS for s in (open_tag(t), close_tag(t)))


def world_texts(world: World) -> Iterator[str]:
    """Texts of the training split as the policy will see them: each question, and per hop every
    candidate's call, its right and "unknown" replies, and the answer chunks."""
    profiles = world.config.candidates
    for q in world.questions("train"):
        yield q["question"]
        for p in profiles:
            yield call_chunk("ask the whole question", p.name, q["question"])
        for hop in q["hops"]:
            phrase = RELATIONS[hop["relation"]].phrase.format(hop["subject"])
            for p in profiles:
                yield call_chunk(f"need {phrase}", p.name, hop["sub_question"])
                yield info_block(reply_text(p, hop["answer"])) + info_block(reply_text(p, UNKNOWN))
            yield answer_chunk(hop["answer"])
        yield answer_chunk(UNKNOWN)


def make_world_tokenizer(
    world: World, extra_texts: Iterable[str] = (), vocab_size: int = 640
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (`vocab_size` includes the 256 byte tokens) on `world_texts(world)` and
    `extra_texts` (e.g. the prompt), then add the 8 tag strings and the candidate names as single
    tokens, every entity name (of both splits) as one token, and the special pad "<|pad|>" and eos
    "<|endoftext|>". Any text round-trips exactly (`decode(encode(s)) == s`); no special token is
    added by `encode` and there is no chat template. One token per name lets a tiny model learn to
    copy a name it has never seen asked about (a multi-token copy needs induction circuits that take
    far longer to train than the CPU budget allows); test names reach training only as wrong replies."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = list(world_texts(world)) + list(extra_texts)
    tok.train_from_iterator(corpus, trainer)
    names = [p.name for p in world.config.candidates]
    entities = sorted({e for kind in world.entities for e in world.entities_of(kind)}, key=lambda e: (-len(e), e))
    # normalized=False: matched on the raw text; no strip: the spaces around a tag stay ordinary tokens
    tok.add_tokens([AddedToken(s, single_word=False, lstrip=False, rstrip=False, normalized=False)
                    for s in TAG_STRINGS + tuple(names) + tuple(entities)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   clean_up_tokenization_spaces=False)
