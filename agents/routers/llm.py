"""LLM routers: a causal LM writes the whole trajectory itself, greedily, through the rollout engine.

`policy:<checkpoint dir>` is a trained policy (train.py writes `<run>/checkpoints/<step|best>/policy`),
`prompt-llm:<model dir>` an untrained model given the same Router-R1 prompt (same code path), and
`direct:<model dir>` the model answering alone: its episodes allow 0 calls (`max_turns=0`), so the
prompt says it may ask 0 times and any `<search>` it still writes gets "no calls remain; answer now"
and costs nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from agents.routers.base import register_router
from envs.episode import EpisodeConfig


# tokenizer_config.json's class of a tokenizer saved from a plain `tokenizers` object (RouteWorld's BPE)
PLAIN_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: Path):
    """The tokenizer saved beside a model, as it was saved. A plain `tokenizers` tokenizer (RouteWorld's)
    is read by its own class: AutoTokenizer would pick the class of the model's type (Qwen2Tokenizer
    for a Qwen2 policy), whose pre-tokenizer splits digits one by one, so the prices in a prompt would
    get other ids than in training. Any other tokenizer loads through AutoTokenizer."""
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    config = Path(path) / "tokenizer_config.json"
    saved_class = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    loader = PreTrainedTokenizerFast if saved_class in PLAIN_TOKENIZERS else AutoTokenizer
    return loader.from_pretrained(path, local_files_only=True)


class LLMRouter:
    """Loads model and tokenizer from a local folder (never downloads) on first use."""

    name = "policy"
    needs_golden = False
    max_turns: int | None = None  # None: the evaluation's episode.max_turns

    def __init__(self, ctx, arg: str | None = None):
        if not arg:
            raise ValueError(f"router {self.name!r} needs a model folder, e.g. {self.name}:runs/x/checkpoints/best/policy")
        path = Path(arg)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"router '{self.name}:{arg}': {path / 'config.json'} not found; give a folder "
                                    "written by save_pretrained (model and tokenizer)")
        self.ctx, self.path = ctx, path
        self.model = self.tokenizer = None

    def load(self, device: str = "cpu"):
        """(model, tokenizer), loaded once; the tokenizer needs a pad token distinct from EOS."""
        if self.model is None:
            from transformers import AutoModelForCausalLM
            self.tokenizer = load_tokenizer(self.path)
            if self.tokenizer.pad_token_id is None or self.tokenizer.pad_token_id == self.tokenizer.eos_token_id:
                raise ValueError(f"{self.path}: the tokenizer needs a pad token distinct from EOS")
            self.model = AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True).to(device).eval()
        return self.model, self.tokenizer

    def settings(self):
        from agents.routers.base import RouterSetting
        return [RouterSetting()]

    def episode_config(self, base: EpisodeConfig) -> EpisodeConfig:
        return base if self.max_turns is None else dataclasses.replace(base, max_turns=self.max_turns)


@register_router("policy", arg="model dir")
class PolicyRouter(LLMRouter):
    """A trained policy (train.py's `checkpoints/<step|best>/policy`)."""


@register_router("prompt-llm", arg="model dir")
class PromptLLMRouter(LLMRouter):
    """An untrained model given the same Router-R1 prompt."""


@register_router("direct", arg="model dir")
class DirectRouter(LLMRouter):
    max_turns = 0
