"""The env's tokenizer when no LLM acts: a byte-level BPE trained on the task's own texts, with every
tag and candidate name as one token. Scripted routers only need text to round-trip exactly; their
token counts are not charged (no LLM runs)."""

from __future__ import annotations

from typing import Iterable, Sequence

from transformers import PreTrainedTokenizerFast

from envs.bpe import TAG_STRINGS, byte_level_bpe


def text_tokenizer(texts: Iterable[str], candidate_names: Sequence[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """`byte_level_bpe` of `vocab_size` on `texts`, with the 8 tag strings and the candidate names as
    single tokens."""
    return byte_level_bpe(texts, vocab_size, TAG_STRINGS + tuple(candidate_names))
