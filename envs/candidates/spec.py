"""Candidate specs, the request sent to a candidate, the backend interface and its error, and the
ledger entry of one call."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from rewards.tags import check_candidate_name


@dataclass(frozen=True)
class CandidateSpec:
    """One candidate LLM as the policy sees it (name, size, price, description) and as the backend
    serves it (`model`, the backend's model id). Prices are per 1M tokens, in dollars."""

    name: str
    model: str
    params_b: float
    price_per_1m_output: float
    price_per_1m_input: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        check_candidate_name(self.name)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"candidate {self.name!r}: model must be a non-empty string")
        for key in ("params_b", "price_per_1m_output", "price_per_1m_input"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"candidate {self.name!r}: {key}={value!r} must be a number >= 0")


@dataclass(frozen=True)
class RequestConfig:
    """What is sent to a candidate for a sub-query: the messages template and the sampling
    parameters. Both are part of the response-cache key."""

    template: str = "Answer the question with a short, direct answer.\nQuestion: {query}"
    system: str | None = None
    temperature: float = 0.0
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if "{query}" not in self.template:
            raise ValueError(f"request template must contain '{{query}}', got {self.template!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"request temperature must lie in [0, 2], got {self.temperature}")
        if self.max_tokens < 1:
            raise ValueError(f"request max_tokens must be >= 1, got {self.max_tokens}")

    def messages(self, query: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.template.replace("{query}", query)}]

    def sampling(self) -> dict[str, float | int]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}


@dataclass(frozen=True)
class Request:
    """One call: the candidate, the policy's sub-query, the messages built from it, the sampling
    parameters, and the episode's original question (only replay backends read it)."""

    spec: CandidateSpec
    query: str
    messages: list
    sampling: dict
    question: str = ""


class CandidateError(RuntimeError):
    """A candidate call failed for good (after retries); the message is safe to show and log."""


@dataclass
class Completion:
    """What a backend returns for one request. `prompt_tokens`/`completion_tokens` are None when the
    backend could not tell (the pool then counts them with its tokenizer)."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached: bool = False
    attempts: int = 1


CUT_REPLY = "unknown"  # what a reply cut before its answer sentence ends says


def cut_reply(text: str, completion_tokens: int, max_tokens: int) -> tuple[str, int]:
    """A reply of `completion_tokens` tokens as a model stopped after `max_tokens` would give it: its
    words kept in proportion to the tokens paid for (rounded down), and CUT_REPLY when the cut falls
    before its first sentence (the answer sentence) ends, so cutting never makes a reply cheaper and
    still right. Returns (text, tokens charged)."""
    if completion_tokens <= max_tokens:
        return text, completion_tokens
    words = text.split()
    kept = len(words) * max_tokens // completion_tokens
    end = re.search(r"[.!?](\s|$)", text)
    if end is None or kept < len(text[:end.end()].split()):
        return CUT_REPLY, max_tokens
    return " ".join(words[:kept]), max_tokens


class Backend(Protocol):
    async def complete(self, request: Request) -> Completion: ...


@dataclass
class CallRecord:
    """The cost-ledger entry of one candidate call, as recorded in the env's `info`.

    `price_per_1m_input` is the input price actually charged (0 unless prompt tokens are counted),
    so `rewards.raw_cost([record])` equals `cost`; `full_cost` always charges prompt tokens at the
    listed input price. A failed call has `error` set and zero cost. Under a spending cap,
    `budget_left` is what the episode may still spend after this call (None without a cap).
    """

    candidate: str
    query: str
    reply: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    price_per_1m_input: float = 0.0
    price_per_1m_output: float = 0.0
    cost: float = 0.0
    full_cost: float = 0.0
    latency_s: float = 0.0
    error: str | None = None
    cached: bool = False
    attempts: int = 0
    budget_left: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)
