"""The local backend on a tiny random Qwen2 saved to disk: batching changes nothing, counts are exact."""

from __future__ import annotations

import asyncio

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from envs.candidates.local import LocalBackend, render_prompt
from envs.candidates.pool import load_pool
from envs.candidates.spec import CandidateSpec, Request, RequestConfig

CORPUS = ["who wrote hamlet", "what is the capital of france", "two plus two is four", "paris, shakespeare",
          "Answer the question with a short, direct answer.", "Question: user assistant system"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
QUERIES = ["who wrote hamlet", "what is the capital of france", "two plus two", "Paris?",
           "a much longer question about the capital of france and who wrote hamlet"]


def save_tiny_model(path, chat_template: bool = True) -> None:
    """A byte-level BPE tokenizer trained on a few sentences (distinct <pad> and <eos>) and a random
    one-layer Qwen2 over its vocabulary. Weights are drawn wide (std 0.3) so replies depend on the
    prompt, which makes padding mistakes visible."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    if chat_template:
        tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, initializer_range=0.3)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    save_tiny_model(path)
    return str(path)


def pool_for(path: str, max_batch: int, max_tokens: int = 6):
    cfg = {"candidates": [{"name": "Tiny", "model": path, "params_b": 0.0001, "price_per_1m_output": 1.0}],
           "backend": {"kind": "local", "max_batch": max_batch}, "request": {"max_tokens": max_tokens}}
    return load_pool(cfg)


def reference_greedy(backend: LocalBackend, path: str, query: str, max_tokens: int) -> tuple[list[int], list[int]]:
    """Prompt ids and the greedy continuation of one unpadded prompt, step by step with full forwards."""
    lm = backend.models[path]
    prompt = render_prompt(lm.tokenizer, RequestConfig(max_tokens=max_tokens).messages(query))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            next_id = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(next_id)
            if next_id in lm.stop_ids:
                break
    return prompt, ids[len(prompt):]


def test_batched_generation_equals_one_at_a_time(model_dir):
    batched, single = pool_for(model_dir, max_batch=8), pool_for(model_dir, max_batch=1)
    try:
        together = batched.call_many([("Tiny", q, "") for q in QUERIES])
        alone = [single.call("Tiny", q) for q in QUERIES]
        assert batched.backend.batches == 1 and single.backend.batches == len(QUERIES)
    finally:
        batched.close()
        single.close()
    assert all(r.error is None for r in together + alone)
    assert [(r.reply, r.prompt_tokens, r.completion_tokens) for r in together] == \
           [(r.reply, r.prompt_tokens, r.completion_tokens) for r in alone]


def test_token_counts_match_an_unbatched_reference(model_dir):
    pool = pool_for(model_dir, max_batch=8, max_tokens=6)
    try:
        records = pool.call_many([("Tiny", q, "") for q in QUERIES])
        for record, query in zip(records, QUERIES):
            prompt, generated = reference_greedy(pool.backend, model_dir, query, 6)
            assert record.prompt_tokens == len(prompt)
            assert record.completion_tokens == len(generated)
            assert record.cost == pytest.approx(len(generated) * 1.0)
    finally:
        pool.close()


def test_reply_stops_at_eos_which_is_counted_but_not_shown(tmp_path):
    save_tiny_model(tmp_path)
    spec = CandidateSpec("Tiny", str(tmp_path), 0.0001, 1.0)
    backend = LocalBackend([spec], max_batch=2)
    lm = backend.models[str(tmp_path)]
    _, free = reference_greedy(backend, str(tmp_path), QUERIES[0], 6)
    cut = free.index(free[2])            # the first place where the third greedy token occurs
    lm.stop_ids = frozenset({free[2]})   # ... now ends the reply there
    config = RequestConfig(max_tokens=6)
    done = asyncio.run(backend.complete(Request(spec, QUERIES[0], config.messages(QUERIES[0]), config.sampling())))
    assert done.completion_tokens == cut + 1
    assert done.text == lm.tokenizer.decode(free[:cut], skip_special_tokens=True)


def test_prompt_without_chat_template_is_the_joined_messages(tmp_path):
    save_tiny_model(tmp_path, chat_template=False)
    pool = pool_for(str(tmp_path), max_batch=4)
    try:
        record = pool.call("Tiny", "who wrote hamlet")
        tokenizer = pool.backend.models[str(tmp_path)].tokenizer
        joined = "\n".join(m["content"] for m in RequestConfig().messages("who wrote hamlet"))
        assert record.prompt_tokens == len(tokenizer(joined)["input_ids"])
    finally:
        pool.close()


def test_sampling_temperature_is_refused_not_ignored(model_dir):
    cfg = {"candidates": [{"name": "Tiny", "model": model_dir, "params_b": 0.0001, "price_per_1m_output": 1.0}],
           "backend": {"kind": "local"}, "request": {"temperature": 0.7}}
    pool = load_pool(cfg)
    try:
        record = pool.call("Tiny", "paris")
    finally:
        pool.close()
    assert "temperature=0.7" in record.error and record.cost == 0
