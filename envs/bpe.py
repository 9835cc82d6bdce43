"""The tokenizer of a run with no pretrained LLM: a byte-level BPE trained on the task's own texts."""

from __future__ import annotations

from typing import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rewards.tags import TAGS, close_tag, open_tag

PAD, EOS = "<|pad|>", "<|endoftext|>"
TAG_STRINGS = tuple(s for t in TAGS for s in (open_tag(t), close_tag(t)))


def byte_level_bpe(texts: Iterable[str], vocab_size: int, single_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` (the 256 byte tokens included, so any text round-trips:
    `decode(encode(s)) == s`) on `texts`, with pad "<|pad|>" and eos "<|endoftext|>", then add each of
    `single_tokens` as one token, matched on the raw text (the spaces around it stay ordinary tokens).
    `encode` adds no special token and there is no chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    if single_tokens:
        tok.add_tokens([AddedToken(s, single_word=False, lstrip=False, rstrip=False, normalized=False)
                        for s in single_tokens])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   clean_up_tokenization_spaces=False)
