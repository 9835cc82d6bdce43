"""The text a scripted agent writes for one turn: a thought and a call, or a thought and the answer.
RouteWorld's scripts, the warm start and the baseline routers write what a policy would write."""

from __future__ import annotations

from rewards.tags import escape_info

UNKNOWN = "unknown"  # the answer of an agent that found none (also a simulated candidate's "I don't know")


def call_chunk(think: str, name: str, query: str) -> str:
    """A thought, then a call: "<think> {think} </think>\n<search> {name}: {query} </search>", with
    the copied texts escaped (`escape_info`) so none can close its block."""
    return f"<think> {escape_info(think)} </think>\n<search> {name}: {escape_info(query)} </search>"


def answer_chunk(answer: str) -> str:
    """A thought, then the answer: "<think> the answer is X </think>\n<answer> X </answer>", X
    escaped (`escape_info`) as it may be copied from a reply."""
    answer = escape_info(answer)
    think = "no answer found" if answer == UNKNOWN else f"the answer is {answer}"
    return f"<think> {think} </think>\n<answer> {answer} </answer>"
