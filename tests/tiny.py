"""Tiny, fully local building blocks for tests: byte-level BPE tokenizers, a random two-layer Qwen2
and the overrides of a tiny run."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

from envs.bpe import byte_level_bpe
from rewards.tags import TAGS

CORPUS = [
    "<think> I should ask the geography expert. </think>",
    "<search> Geo-Expert: In which country is Korvan? </search>",
    "<info> Korvan is in Tessaly. </info>",
    "<answer> Tessaly </answer>",
    "Answer the question below. Candidate models: Question: Where is Paris? The answer is France.",
    "Qwen2.5-7B-Instruct LLaMA-3.1-70B-Instruct error: timeout unknown candidate no calls remain",
    "émoji 🙂 and 北京 are unicode; colons: a: b: c. 0123456789",
]


# train.py overrides shared by the end-to-end tests: an easy RouteWorld, compact prompts, two turns
# and a one-layer random policy; each test adds its own sizes
TINY_RUN = [
    "task.world_preset=easy", "episode.prompt_template=compact", "episode.max_turns=2",
    "model.init={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, "
    "intermediate_size: 64}",
    "optim.actor_lr=1e-3", "optim.critic_lr=1e-3",
]


def tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few lines: any text round-trips; pad and eos are distinct."""
    return byte_level_bpe(CORPUS * 3, vocab_size)


def tiny_tag_tokenizer() -> PreTrainedTokenizerFast:
    """Like `tiny_tokenizer` but every tag is one token (as in the RouteWorld tokenizer)."""
    tok = tiny_tokenizer()
    tok.add_tokens([f"<{t}>" for t in TAGS] + [f"</{t}>" for t in TAGS])
    return tok


def tiny_metaspace_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (Metaspace: a word's leading space is part of its token, and dropped
    when it starts the decoded text), with byte fallback so any text round-trips."""
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=["<pad>", "</s>", *byte_tokens],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)


def tiny_qwen(vocab: int, seed: int = 0):
    """A random two-layer Qwen2 (hidden 32, grouped-query attention, SDPA) for `vocab` ids, in eval mode."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, initializer_range=0.5)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)
