"""A tokenizer without a usable pad gets one by the rule of agents/pad_token.py: a reused special
token that is no EOS, no BOS and not in the chat template, else a new `<|pad|>`."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from agents.pad_token import NEW_PAD, ensure_pad_token

TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"


def llama_like(specials: list[str], pad: str | None, template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """A small BPE with `<s>` (BOS) and `</s>` (EOS) and `specials`, pad `pad`, and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["hello world, a small corpus"] * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token=pad,
                                  additional_special_tokens=specials)
    out.chat_template = template
    return out


@pytest.mark.parametrize("specials, pad, generation_eos, expected", [
    (["<unk>", "<|reserved|>"], None, None, "reused <unk>"),             # no pad: an unknown token serves
    (["<|reserved|>", "<pad_me>"], "</s>", None, "reused <pad_me>"),    # pad is EOS: a pad-named token first
    (["<|eot|>", "<unk>"], None, [1, 2], "reused <unk>"),               # generation EOS ids are not reused
    (["<|eot|>"], None, [2], f"added {NEW_PAD}"),                       # nothing left: a new token
])
def test_the_pad_rule(specials, pad, generation_eos, expected):
    tok = llama_like(specials, pad)
    n = len(tok)
    assert ensure_pad_token(tok, generation_eos) == expected
    assert tok.pad_token_id not in {tok.eos_token_id, tok.bos_token_id, *(generation_eos or [])}
    assert len(tok) == n + (1 if expected.startswith("added") else 0)
    assert tok.pad_token not in tok.chat_template


def test_a_special_token_of_the_chat_template_is_never_the_pad():
    template = TEMPLATE.replace("</s>", "<|im_end|>")
    tok = llama_like(["<|im_end|>"], None, template)
    assert ensure_pad_token(tok) == f"added {NEW_PAD}"


def test_a_pad_that_is_no_eos_is_kept():
    tok = llama_like(["<pad>"], "<pad>")
    assert ensure_pad_token(tok) == "kept" and tok.pad_token == "<pad>"


def test_an_added_pad_starts_at_the_mean_embedding_and_stays_tied(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from agents.config import ModelConfig
    from agents.policy import build_actor
    tok = llama_like(["<|eot|>"], None)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    assert ensure_pad_token(tok, [2]) == f"added {NEW_PAD}"
    model = build_actor(ModelConfig(name_or_path=str(tmp_path)), len(tok), tok.pad_token_id, tok.eos_token_id,
                        torch.device("cpu"))
    rows = model.get_input_embeddings().weight
    assert rows.shape[0] == len(tok)
    assert torch.allclose(rows[-1], rows[:-1].mean(dim=0))
    assert model.get_output_embeddings().weight.data_ptr() == rows.data_ptr()
