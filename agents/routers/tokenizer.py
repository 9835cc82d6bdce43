"""The env's tokenizer when no LLM acts: a byte-level BPE trained on the task's own texts, with every
tag and candidate name as one token. Scripted routers only need text to round-trip exactly; their
token counts are not charged (no LLM runs)."""

from __future__ import annotations

from typing import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from envs.tags import TAGS, close_tag, open_tag

PAD, EOS = "<|pad|>", "<|endoftext|>"


def text_tokenizer(texts: Iterable[str], candidate_names: Sequence[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` on `texts` (any text still round-trips: the 256 bytes are
    in the alphabet), then add the 8 tag strings and the candidate names as single tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    tags = tuple(s for t in TAGS for s in (open_tag(t), close_tag(t)))
    tok.add_tokens([AddedToken(s, single_word=False, lstrip=False, rstrip=False, normalized=False)
                    for s in tags + tuple(candidate_names)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   clean_up_tokenization_spaces=False)
