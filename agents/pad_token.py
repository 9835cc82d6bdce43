"""A pad token for any Hugging Face tokenizer, without hand edits.

Rule: a pad token must not be an end of sequence, or padding would read as "the episode ended" and
EOS would be masked out of the loss. So when the tokenizer has no pad, or its pad is an EOS id (the
tokenizer's own or one of `generation_config.eos_token_id`), the pad becomes

1. an existing special token that is no EOS, no BOS and does not occur in the chat template (so the
   model never sees it in a prompt), preferring one named like a pad, then like "unknown";
2. else a new token `<|pad|>`; the model then grows one embedding row, which `build_actor` starts at
   the mean of the others (tied input and output embeddings stay tied).

The choice is logged and saved with the tokenizer, so training, evaluation and serving pad alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

NEW_PAD = "<|pad|>"


def eos_ids(tokenizer, generation_eos: int | Iterable[int] | None = None) -> set[int]:
    """Every id that ends a sequence: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos is not None:
        ids.update(int(i) for i in generation_eos)
    return ids


def reusable_pad(tokenizer, ends: set[int]) -> str | None:
    """A special token that may pad (see the module docstring), or None."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    bos = tokenizer.bos_token_id
    specials = list(dict.fromkeys(tokenizer.all_special_tokens + [t.content for t in
                                                                  tokenizer.added_tokens_decoder.values() if t.special]))
    fits = [t for t in specials
            if (i := tokenizer.convert_tokens_to_ids(t)) is not None and i not in ends and i != bos and t not in template]

    def preference(token: str) -> int:
        low = token.lower()
        return 0 if "pad" in low else 1 if "unk" in low else 2
    return min(fits, key=preference) if fits else None


def generation_eos(path: str) -> int | list[int] | None:
    """`generation_config.json`'s eos_token_id of the model at `path` (None when it has none)."""
    from transformers import GenerationConfig
    try:
        return GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        return None


def ensure_pad_token(tokenizer, generation_eos: int | Iterable[int] | None = None) -> str:
    """Give `tokenizer` a pad token that is no EOS (in place); returns "kept", "reused <token>" or
    "added <|pad|>"."""
    ends = eos_ids(tokenizer, generation_eos)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in ends:
        return "kept"
    token = reusable_pad(tokenizer, ends)
    if token is not None:
        tokenizer.pad_token = token
        choice = f"reused {token}"
    else:
        tokenizer.add_special_tokens({"pad_token": NEW_PAD})
        choice = f"added {NEW_PAD}"
    log.info("tokenizer: pad token was %s; %s (id %d)", "missing" if not ends else "absent or an EOS",
             choice, tokenizer.pad_token_id)
    return choice
