"""Per-query outcome tables: each candidate's quality and cost on each question, for training
single-round routers, for the oracle, and for the Routing Score bounds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from envs.candidates.pool import CandidatePool
from envs.candidates.replay import ReplayTable
from envs.candidates.spec import CandidateSpec
from rewards.answer import exact_match


@dataclass
class OutcomeData:
    """Outcomes of `candidates` on `questions`: quality (Q, M) in [0, 1], raw cost (Q, M) in
    micro-dollars, and the reply texts (Q lists of M) when they are known, else None."""

    questions: list[str]
    candidates: list[str]
    quality: np.ndarray
    cost: np.ndarray
    replies: list[list[str]] | None = None

    def __post_init__(self) -> None:
        shape = (len(self.questions), len(self.candidates))
        if self.quality.shape != shape or self.cost.shape != shape:
            raise ValueError(f"outcomes: quality {self.quality.shape} and cost {self.cost.shape} must be {shape}")
        if len(self.questions) == 0:
            raise ValueError("outcomes: no questions")

    def best(self) -> np.ndarray:
        """(Q,) per question the candidate of highest quality, ties to the lowest cost, then the first."""
        order = np.lexsort((self.cost, -self.quality), axis=1)  # per row: best quality, then cheapest
        return order[:, 0]


def from_replay_table(table: ReplayTable, specs: Sequence[CandidateSpec], questions: Sequence[str]) -> OutcomeData:
    """Recorded scores of `specs` on `questions` (keys of the table). Cost of a call: its recorded
    completion tokens, else the table's typical count for the model, times the output price (the
    replay pool's default ledger: prompt tokens not charged)."""
    quality = np.zeros((len(questions), len(specs)))
    cost = np.zeros_like(quality)
    for i, text in enumerate(questions):
        q = table.questions.get(text.strip())
        if q is None:
            raise ValueError(f"replay table: no outcomes for question {text[:80]!r}")
        for j, spec in enumerate(specs):
            o = q.outcomes.get(spec.model)
            if o is None:
                raise ValueError(f"replay table: model {spec.model!r} has no outcome on question {text[:80]!r}")
            tokens = o.completion_tokens or table.typical_tokens.get(spec.model)
            if tokens is None:
                raise ValueError(f"replay table: no token count for model {spec.model!r}")
            quality[i, j], cost[i, j] = o.correct, tokens * spec.price_per_1m_output
    return OutcomeData(list(questions), [s.name for s in specs], quality, cost)


def from_calls(pool: CandidatePool, questions: Sequence[str], golden: Sequence[Sequence[str]],
               answer: Callable[[str, str], str], batch: int = 512) -> OutcomeData:
    """Call every candidate once with each whole question and score its answer by exact match.

    `answer(question, reply)` turns a reply into the answer a single-call router would give. A failed
    call scores 0 at cost 0. These calls are made outside any episode: for training data (golden
    answers of the training split) and for the oracle and Routing Score bounds on the test split.
    """
    names = pool.names
    quality = np.zeros((len(questions), len(names)))
    cost = np.zeros_like(quality)
    replies: list[list[str]] = [[""] * len(names) for _ in questions]
    calls = [(i, j) for i in range(len(questions)) for j in range(len(names))]
    for start in range(0, len(calls), batch):
        part = calls[start:start + batch]
        records = pool.call_many([(names[j], questions[i], questions[i]) for i, j in part])
        for (i, j), r in zip(part, records):
            if r.error:
                continue
            replies[i][j] = r.reply
            quality[i, j] = exact_match(answer(questions[i], r.reply), list(golden[i]))
            cost[i, j] = r.cost
    return OutcomeData(list(questions), names, quality, cost, replies)
