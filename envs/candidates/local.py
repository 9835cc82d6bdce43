"""The `local` backend: a transformers causal LM in this process, serving waiting requests in batches."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from envs.candidates.pool import register_backend
from envs.candidates.spec import CandidateSpec, Completion, Request


@dataclass
class LoadedModel:
    """One checkpoint: the model, its tokenizer, the token ids that end a reply, and its queue."""

    path: str
    model: object                                    # a transformers causal LM
    tokenizer: object
    stop_ids: frozenset[int]
    pad_id: int
    waiting: list = field(default_factory=list)      # (request, future) pairs not yet served
    worker: asyncio.Task | None = None


def load_model(path: str, device: str = "cpu", dtype: str = "auto") -> LoadedModel:
    """Load a checkpoint with `from_pretrained`. A reply ends at any id that the tokenizer or the
    generation config names as end-of-sequence; the pad id is the tokenizer's, else the first stop id."""
    # torch and transformers load here, not at import: `load_pool` imports every backend module
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype, None)
    if not (torch_dtype == "auto" or isinstance(torch_dtype, torch.dtype)):
        raise ValueError(f"local backend: dtype={dtype!r} is not 'auto' or a torch dtype name such as 'bfloat16'")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    stop = {tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)}
    stop_ids = frozenset(i for s in stop for i in (s if isinstance(s, (list, tuple, set)) else [s]) if i is not None)
    if not stop_ids:
        raise ValueError(f"local model {path}: neither the tokenizer nor the generation config names an eos token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    return LoadedModel(path, model, tokenizer, stop_ids, pad_id)


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids: the chat template with the generation prompt when the tokenizer has one (the
    template writes its own special tokens), else the message contents joined by newlines with the
    tokenizer's usual special tokens."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer("\n".join(m["content"] for m in messages))["input_ids"]


def generate_batch(lm: LoadedModel, prompts: Sequence[list[int]], max_tokens: Sequence[int]) -> list[tuple[list[int], int]]:
    """Greedy replies to a batch of prompt ids, left-padded to one length. Returns, per prompt, the
    reply ids before the first stop id and the number of tokens generated, stop id included (what
    a server bills as completion tokens), each cut to its own `max_tokens`."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), lm.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    device = next(lm.model.parameters()).device
    with torch.no_grad():
        out = lm.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=max(max_tokens), do_sample=False, num_beams=1,
            eos_token_id=sorted(lm.stop_ids), pad_token_id=lm.pad_id,
        )
    replies = []
    for row, limit in enumerate(max_tokens):
        new = out[row, width:width + limit].tolist()
        end = next((i for i, t in enumerate(new) if t in lm.stop_ids), None)
        replies.append((new, len(new)) if end is None else (new[:end], end + 1))
    return replies


class LocalBackend:
    """Serves each candidate with the checkpoint at `model_path` (shared by all candidates) or, when
    it is None, at the candidate's `model`. Requests that wait while a batch runs, or arrive within
    `batch_window_s`, form the next batch (at most `max_batch`); generation runs in a worker thread
    so the event loop keeps serving other backends. Decoding is greedy: a request with
    temperature > 0 is refused rather than silently decoded greedily."""

    def __init__(self, specs: Sequence[CandidateSpec], model_path: str | None = None, device: str = "cpu",
                 dtype: str = "auto", max_batch: int = 8, batch_window_s: float = 0.002):
        if max_batch < 1:
            raise ValueError(f"local backend: max_batch={max_batch!r} must be >= 1")
        self.model_path = model_path
        self.max_batch = int(max_batch)
        self.batch_window_s = float(batch_window_s)
        self.models: dict[str, LoadedModel] = {}
        for spec in specs:
            path = self.path_of(spec)
            if path not in self.models:
                self.models[path] = load_model(path, device, dtype)
        self.batches = 0    # generate calls made, for throughput logs and tests
        self.requests = 0

    def __repr__(self) -> str:
        return f"LocalBackend(models={sorted(self.models)}, max_batch={self.max_batch})"

    def path_of(self, spec: CandidateSpec) -> str:
        return self.model_path or spec.model

    async def complete(self, request: Request) -> Completion:
        temperature = request.sampling.get("temperature", 0.0)
        if temperature:
            raise ValueError(f"local backend decodes greedily; got temperature={temperature} for "
                             f"{request.spec.name} (set request.temperature: 0)")
        lm = self.models.get(self.path_of(request.spec))
        if lm is None:
            raise KeyError(f"local backend has no model loaded for candidate {request.spec.name!r}")
        done = asyncio.get_running_loop().create_future()
        lm.waiting.append((request, done))
        if lm.worker is None or lm.worker.done():
            lm.worker = asyncio.create_task(self._serve(lm))
        return await done

    async def _serve(self, lm: LoadedModel) -> None:
        """Run batches of waiting requests until none is left; one batch per model at a time."""
        while lm.waiting:
            await asyncio.sleep(self.batch_window_s)
            batch, lm.waiting = lm.waiting[:self.max_batch], lm.waiting[self.max_batch:]
            try:
                prompts = [render_prompt(lm.tokenizer, r.messages) for r, _ in batch]
                limits = [int(r.sampling.get("max_tokens", 512)) for r, _ in batch]
                replies = await asyncio.to_thread(generate_batch, lm, prompts, limits)
            except Exception as e:  # noqa: BLE001 -- handed to every caller of the batch, who sees it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.batches += 1
            self.requests += len(batch)
            for (_, future), prompt, (ids, n_generated) in zip(batch, prompts, replies):
                if not future.done():
                    text = lm.tokenizer.decode(ids, skip_special_tokens=True)
                    future.set_result(Completion(text, prompt_tokens=len(prompt), completion_tokens=n_generated))


@register_backend("local")
def _make_local(specs: Sequence[CandidateSpec], **options) -> LocalBackend:
    return LocalBackend(specs, **options)
