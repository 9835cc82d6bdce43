"""Replay candidates: what real models were recorded to answer on known questions, served as a backend.

An outcome table maps each question to each model's recorded result (a quality score, and where the
source has them the response text and its token count). Two loaders build tables from the files in
`data/`: LLMRouter's scores for 9 NVIDIA-hosted models (`load_llmrouter_outcomes`) and RouteLLM's
GSM8K responses of Mixtral-8x7B and GPT-4 (`load_routellm_gsm8k`). See data/README.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from envs.candidates.pool import register_backend
from envs.candidates.spec import CandidateError, CandidateSpec, Completion, Request
from envs.data import QAExample
from rewards.answer import normalize_answer

CORRECT_AT = 0.5  # a recorded score >= this counts as a correct answer
TOKENS_PER_WORD = 4 / 3  # rough English BPE rate, used when a response has no recorded token count

# LLMRouter records no outputs, so each call is charged this many completion tokens unless the
# caller says otherwise. 100 sits between the median lengths of the real GSM8K answers recorded in
# data/routellm (about 69 tokens for Mixtral-8x7B, 104 for GPT-4, at TOKENS_PER_WORD).
LLMROUTER_TYPICAL_TOKENS = 100


@dataclass(frozen=True)
class Outcome:
    """One model's recorded result on one question: `correct` is the source's score in [0, 1]."""

    correct: float
    response: str | None = None
    completion_tokens: int | None = None


@dataclass
class ReplayQuestion:
    """A question, its golden answers (empty when the source has none), its benchmark, and the
    recorded outcome of each model, keyed by backend model id (`CandidateSpec.model`)."""

    question: str
    golden_answers: list[str]
    dataset: str
    outcomes: dict[str, Outcome]


@dataclass
class ReplayTable:
    """Recorded outcomes by question text (stripped), and per model the completion-token count
    charged when neither a count nor a response text is recorded."""

    questions: dict[str, ReplayQuestion]
    typical_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return sorted({m for q in self.questions.values() for m in q.outcomes})

    def examples(self) -> list[QAExample]:
        """The questions that have golden answers, as QA examples an episode can be built from."""
        return [QAExample(q.question, list(q.golden_answers), f"{q.dataset}-{i}", q.dataset)
                for i, q in enumerate(self.questions.values()) if q.golden_answers]


def estimate_tokens(text: str) -> int:
    """Completion tokens of a text with no recorded count: ceil(words * 4/3), at least 1."""
    return max(1, math.ceil(len(text.split()) * TOKENS_PER_WORD))


def _stable_seed(*parts: str) -> int:
    # sha256 rather than hash(): Python salts str hashes per process.
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "little")


class ReplayBackend:
    """Answers a call with what the called model was recorded to say about the episode's question.

    Rule: the question is `request.question` (or, when that is empty, the sub-query itself); the
    model is `request.spec.model`. The reply is the recorded response text when there is one;
    otherwise the first golden answer when the recorded score is >= 0.5, and else a wrong answer
    drawn from other questions' golden answers (same benchmark first), never equal to a golden answer
    after normalization, and fixed by (seed, question, model). The wording of the sub-query is
    ignored: a replayed model answers the episode's question however it is asked. Completion tokens
    are the recorded count, else `estimate_tokens(response)`, else the table's typical count for the
    model. A question or model missing from the table raises `CandidateError`, which the pool turns
    into a failed call.
    """

    def __init__(self, table: ReplayTable, seed: int = 0, data_dir: str | None = None):
        self.table = table
        self.seed = seed
        self.data_dir = data_dir  # the folder the outcomes came from, when loaded from one
        # Distractors: each benchmark's distinct first golden answers, sorted so draws are reproducible.
        by_dataset: dict[str, set[str]] = {}
        for q in table.questions.values():
            if q.golden_answers:
                by_dataset.setdefault(q.dataset, set()).add(q.golden_answers[0])
        # Each is kept with its normalized form, which decides whether it would count as golden.
        self._distractors = {d: [(a, normalize_answer(a)) for a in sorted(s)] for d, s in by_dataset.items()}
        everything = sorted(set().union(*by_dataset.values())) if by_dataset else []
        self._all_distractors = [(a, normalize_answer(a)) for a in everything]

    def find(self, request: Request) -> ReplayQuestion:
        key = (request.question or request.query).strip()
        found = self.table.questions.get(key)
        if found is None:
            raise CandidateError(f"replay: no recorded outcomes for question {key[:80]!r}")
        return found

    def wrong_answer(self, q: ReplayQuestion, model: str) -> str:
        """A deterministic wrong answer for `model` on `q`: another question's golden answer."""
        golden = {normalize_answer(g) for g in q.golden_answers}
        for pool in (self._distractors.get(q.dataset, []), self._all_distractors):
            choices = [a for a, norm in pool if norm not in golden]
            if choices:
                rng = np.random.default_rng(_stable_seed(str(self.seed), q.question, model))
                return choices[int(rng.integers(len(choices)))]
        raise CandidateError(f"replay: no wrong answer to draw for question {q.question[:80]!r}")

    async def complete(self, request: Request) -> Completion:
        q = self.find(request)
        model = request.spec.model
        outcome = q.outcomes.get(model)
        if outcome is None:
            raise CandidateError(f"replay: model {model!r} has no recorded outcome for question {q.question[:80]!r}")
        if outcome.response is not None:
            text = outcome.response
        elif not q.golden_answers:
            raise CandidateError(f"replay: question {q.question[:80]!r} has no recorded response and no golden "
                                 f"answer, so {model!r}'s reply cannot be replayed")
        elif outcome.correct >= CORRECT_AT:
            text = q.golden_answers[0]
        else:
            text = self.wrong_answer(q, model)
        tokens = outcome.completion_tokens
        if tokens is None:
            tokens = estimate_tokens(text) if outcome.response is not None else self.table.typical_tokens.get(model)
        if tokens is None:
            raise CandidateError(f"replay: no token count for {model!r}: record completion_tokens or typical_tokens")
        return Completion(text, completion_tokens=int(tokens))


# ---------------------------------------------------------------------------------------------------
# LLMRouter (github.com/ulab-uiuc/LLMRouter): per-question scores of 9 models, prices in default_llm.json.

# Display name and a short description (ours, from the file's `feature` text, prices left out since
# the prompt shows them) for each model that has scores.
LLMROUTER_MODELS = {
    "qwen2.5-7b-instruct": ("Qwen2.5-7B-Instruct", "Qwen 2.5 instruction model with strong multilingual skills."),
    "codegemma-7b": ("CodeGemma-7B", "Gemma variant specialised in writing and completing code."),
    "gemma-2-9b-it": ("Gemma-2-9B-IT", "Google's compact instruction-tuned model for general text and chat."),
    "llama-3.1-8b-instruct": ("Llama-3.1-8B-Instruct", "Meta's Llama 3.1 chat model for dialogue and reasoning."),
    "llama3-chatqa-1.5-8b": ("Llama3-ChatQA-1.5-8B", "NVIDIA's Llama 3 fine-tune for question answering."),
    "mistral-7b-instruct-v0.3": ("Mistral-7B-Instruct-v0.3", "Fast, efficient instruction-following model."),
    "llama-3.3-nemotron-super-49b-v1": ("Llama-3.3-Nemotron-Super-49B-v1",
                                        "NVIDIA Nemotron model tuned for accuracy on demanding tasks."),
    "llama-3.1-nemotron-51b-instruct": ("Llama-3.1-Nemotron-51B-Instruct",
                                        "NVIDIA's aligned Llama 3.1 model for safe, accurate answers."),
    "llama3-chatqa-1.5-70b": ("Llama3-ChatQA-1.5-70B", "Large Llama 3 fine-tune for conversational QA."),
}


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _params_b(size: str, where: str) -> float:
    m = re.fullmatch(r"\s*([\d.]+)\s*[bB]\s*", str(size))
    if m is None:
        raise ValueError(f"{where}: field 'size' {size!r} is not like '7B'")
    return float(m.group(1))


def llmrouter_specs(data_dir: str | Path) -> list[CandidateSpec]:
    """Specs for the 9 scored models: sizes and prices (input = output, $/1M) from default_llm.json,
    backend model ids as served on NVIDIA NIM (the file's `model` field)."""
    path = resolve_data_dir(data_dir) / "default_llm.json"
    info = _read_json(path)
    specs = []
    for key, (name, description) in LLMROUTER_MODELS.items():
        if key not in info:
            raise ValueError(f"{path}: no entry for model {key!r}")
        entry, where = info[key], f"{path} [{key!r}]"
        for f in ("size", "model", "input_price", "output_price"):
            if f not in entry:
                raise ValueError(f"{where}: field {f!r} is missing")
        specs.append(CandidateSpec(name=name, model=entry["model"], params_b=_params_b(entry["size"], where),
                                   price_per_1m_output=float(entry["output_price"]),
                                   price_per_1m_input=float(entry["input_price"]), description=description))
    return specs


def _score_rows(path: Path) -> list[tuple[str, dict[str, float]]]:
    rows = _read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON array of rows")
    out = []
    for i, row in enumerate(rows, start=1):
        for f in ("question", "scores"):
            if not row.get(f):
                raise ValueError(f"{path} row {i}: field {f!r} is missing or empty")
        out.append((row["question"].strip(), {m: float(s) for m, s in row["scores"].items()}))
    return out


def load_llmrouter_outcomes(
    data_dir: str | Path, typical_tokens: int = LLMROUTER_TYPICAL_TOKENS,
) -> tuple[list[CandidateSpec], ReplayTable, list[QAExample]]:
    """Specs, the outcome table of train.json + test.json, and the test questions with golden answers.

    Golden answers and task names come from default_query_test.jsonl (it covers every test.json
    question); train.json questions have scores but no golden answers, so they serve single-round
    routers, not episodes. No responses or token counts are recorded: each call is charged
    `typical_tokens` completion tokens.
    """
    root = resolve_data_dir(data_dir)
    specs = llmrouter_specs(root)
    model_id = {key: spec.model for key, spec in zip(LLMROUTER_MODELS, specs)}
    golden: dict[str, tuple[str, str]] = {}
    qpath = root / "default_query_test.jsonl"
    with open(qpath, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{qpath} row {i}: not valid JSON ({e})") from None
                for k in ("query", "ground_truth", "task_name"):
                    if not str(row.get(k) or "").strip():
                        raise ValueError(f"{qpath} row {i}: field {k!r} is missing or empty")
                golden[row["query"].strip()] = (str(row["ground_truth"]).strip(), row["task_name"])
    questions: dict[str, ReplayQuestion] = {}
    for name in ("train.json", "test.json"):
        for question, scores in _score_rows(root / name):
            unknown = set(scores) - set(model_id)
            if unknown:
                raise ValueError(f"{root / name}: question {question[:80]!r} scores unknown model(s) {sorted(unknown)}")
            answer, task = golden.get(question, (None, "llmrouter-" + name.removesuffix(".json")))
            outcomes = {model_id[m]: Outcome(correct=s) for m, s in scores.items()}
            questions[question] = ReplayQuestion(question, [answer] if answer else [], task, outcomes)
    table = ReplayTable(questions, {s.model: typical_tokens for s in specs})
    return specs, table, table.examples()


# ---------------------------------------------------------------------------------------------------
# RouteLLM (github.com/lm-sys/RouteLLM): GSM8K test responses of Mixtral-8x7B and GPT-4, judged by RouteLLM.

MIXTRAL, GPT4 = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"

# Public list prices ($/1M tokens), not recorded in the data: OpenAI's for gpt-4-1106-preview, and the
# common hosted price for Mixtral-8x7B-Instruct (input and output alike). GPT-4's size is undisclosed.
ROUTELLM_SPECS = (
    CandidateSpec("Mixtral-8x7B", MIXTRAL, params_b=46.7, price_per_1m_output=0.6, price_per_1m_input=0.6,
                  description="Mistral's open mixture-of-experts model (8 experts, 13B active)."),
    CandidateSpec("GPT-4-1106", GPT4, params_b=0, price_per_1m_output=30.0, price_per_1m_input=10.0,
                  description="OpenAI's GPT-4 Turbo preview, a strong general reasoner (size undisclosed)."),
)

_FINAL_MARK = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _clean_number(text: str) -> str:
    return text.strip().replace(",", "").replace("$", "").rstrip(".").strip()


def _gsm8k_golden(correct: dict[str, bool], responses: dict[str, str]) -> str | None:
    """GSM8K's answer, read off a response RouteLLM judged correct: Mixtral's `#### n` line (GSM8K's
    own answer format) first, else the last number in GPT-4's reply. Where both were judged correct and both
    rules apply they agree on 507 of 513 rows, so a few answers taken from GPT-4 alone may be off."""
    if correct[MIXTRAL]:
        m = _FINAL_MARK.search(responses[MIXTRAL])
        if m and _clean_number(m.group(1)):
            return _clean_number(m.group(1))
    if correct[GPT4]:
        numbers = _NUMBER.findall(responses[GPT4])
        if numbers:
            return _clean_number(numbers[-1])
    return None


def load_routellm_gsm8k(data_dir: str | Path) -> tuple[list[CandidateSpec], ReplayTable, list[QAExample]]:
    """Specs for Mixtral-8x7B and GPT-4-1106, their recorded GSM8K responses and correctness, and
    the questions with a golden answer (the file has none: see `_gsm8k_golden`; the questions
    neither model solved are in the table but not in the returned examples)."""
    path = resolve_data_dir(data_dir) / "gsm8k_responses.csv"
    columns = ("prompt", MIXTRAL, GPT4, MIXTRAL + "_response", GPT4 + "_response")
    questions: dict[str, ReplayQuestion] = {}
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        for i, row in enumerate(reader, start=1):
            correct = {}
            for m in (MIXTRAL, GPT4):
                if row[m] not in ("True", "False"):
                    raise ValueError(f"{path} row {i}: field {m!r} is {row[m]!r}, expected True or False")
                correct[m] = row[m] == "True"
            question = (row["prompt"] or "").strip()
            if not question:
                raise ValueError(f"{path} row {i}: field 'prompt' is empty")
            responses = {m: row[m + "_response"] or "" for m in (MIXTRAL, GPT4)}
            answer = _gsm8k_golden(correct, responses)
            outcomes = {m: Outcome(float(correct[m]), responses[m]) for m in (MIXTRAL, GPT4)}
            questions[question] = ReplayQuestion(question, [answer] if answer else [], "gsm8k", outcomes)
    table = ReplayTable(questions)
    return list(ROUTELLM_SPECS), table, table.examples()


# ---------------------------------------------------------------------------------------------------
# The factory a pool YAML names: backend: {kind: replay, source: llmrouter, data_dir: data/llmrouter}

SOURCES: dict[str, Callable[..., tuple[list[CandidateSpec], ReplayTable, list[QAExample]]]] = {
    "llmrouter": load_llmrouter_outcomes,
    "routellm_gsm8k": load_routellm_gsm8k,
}


def resolve_data_dir(data_dir: str | Path) -> Path:
    """`data_dir` as given if it exists; a relative path that does not is tried against the
    repository root, so configs can say `data/llmrouter` from any working directory."""
    path = Path(data_dir)
    if path.is_dir():
        return path
    in_repo = Path(__file__).resolve().parents[2] / path
    if not path.is_absolute() and in_repo.is_dir():
        return in_repo
    raise FileNotFoundError(f"replay data folder {str(data_dir)!r} not found (looked in {Path.cwd()} and {in_repo.parent})")


@register_backend("replay")
def _make_replay(specs: Sequence[CandidateSpec], source: str, data_dir: str, seed: int = 0,
                 typical_tokens: int | None = None) -> ReplayBackend:
    """Load `source`'s outcomes from `data_dir`; every candidate's model must have recorded outcomes."""
    if source not in SOURCES:
        raise ValueError(f"unknown replay source {source!r}; known: {', '.join(sorted(SOURCES))}")
    extra = {"typical_tokens": typical_tokens} if typical_tokens is not None else {}
    if extra and source != "llmrouter":
        raise ValueError(f"replay source {source!r} records its responses; typical_tokens applies to llmrouter only")
    _, table, _ = SOURCES[source](data_dir, **extra)
    known = set(table.models)
    for spec in specs:
        if spec.model not in known:
            raise ValueError(f"candidate {spec.name!r}: model {spec.model!r} has no outcomes in replay source "
                             f"{source!r}; known models: {', '.join(sorted(known))}")
    return ReplayBackend(table, seed=seed, data_dir=str(data_dir))
