"""The answer reader: a causal LM (the base policy model) reads a candidate's free-text reply and
writes the short final answer, for single-call routers over real models."""

from __future__ import annotations

from pathlib import Path

READ_PROMPT = ("Question: {question}\nAn assistant replied: {reply}\n"
               "Give only the final answer, in a few words.\nAnswer:")


class AnswerReader:
    """Greedy decoding of at most `max_new_tokens` after `READ_PROMPT`; the first line is the answer.
    `read` returns (answer, prompt tokens + generated tokens) so the caller can charge them."""

    def __init__(self, model_dir: str, max_new_tokens: int = 24, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"routers.reader_model: {path / 'config.json'} not found")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
        self.max_new_tokens, self.device = max_new_tokens, device

    def read(self, question: str, reply: str) -> tuple[str, int]:
        import torch
        ids = self.tokenizer(READ_PROMPT.format(question=question, reply=reply), return_tensors="pt").input_ids
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(ids.to(self.device), max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=pad)
        new = out[0, ids.shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip().split("\n")[0]
        return text, int(ids.shape[1] + len(new))
