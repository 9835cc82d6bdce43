"""The format reward: 0 for a well-formed trajectory, -1 otherwise (Router-R1's format penalty)."""

from __future__ import annotations

from typing import Sequence

from rewards.tags import ANSWER, INFO, SEARCH, THINK, TagError, close_tag, open_tag, parse_call, split_blocks

FORMAT_PENALTY = -1.0


def format_errors(response: str, candidate_names: Sequence[str]) -> list[str]:
    """Every rule `response` breaks, in words (empty when well-formed). See `format_reward`."""
    if not isinstance(response, str):
        raise TypeError(f"response must be str, got {type(response).__name__}")
    if isinstance(candidate_names, str):
        raise TypeError("candidate_names must be a sequence of names, not one string")
    candidate_names = tuple(candidate_names)  # read once per search; an iterator would run dry
    errors = []
    text = response.strip()
    if not text.startswith(open_tag(THINK)):
        errors.append("(a) does not start with <think>")
    if not text.endswith(close_tag(ANSWER)):
        errors.append("(a) does not end with </answer>")
    try:
        blocks = split_blocks(text)
    except TagError as e:
        return errors + [f"(b) {e}"]
    answers = [b for b in blocks if b.tag == ANSWER]
    thinks = [b for b in blocks if b.tag == THINK]
    if len(answers) != 1:
        errors.append(f"(c) {len(answers)} <answer> blocks, expected exactly 1")
    if not thinks:
        errors.append("(c) no <think> block")
    if any(not b.content.strip() for b in thinks):
        errors.append("(c) an empty <think> block")
    searches = [i for i, b in enumerate(blocks) if b.tag == SEARCH]
    n_info = sum(b.tag == INFO for b in blocks)
    if len(searches) != n_info:
        errors.append(f"(d) {len(searches)} <search> blocks but {n_info} <info> blocks")
    for i in searches:
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        if nxt is None or nxt.tag != INFO or text[blocks[i].end:nxt.start].strip():
            errors.append(f"(d) <search> at {blocks[i].start} is not followed by an <info> block")
        try:
            parse_call(blocks[i].content, candidate_names)
        except ValueError as e:
            errors.append(f"(e) <search> at {blocks[i].start}: {e}")
    return errors


def format_reward(response: str, candidate_names: Sequence[str]) -> float:
    """0.0 if `response` (everything after the prompt: policy text and inserted `<info>` blocks)
    is well-formed, else -1.0. Well-formed means all of:

    (a) stripped, it starts with `<think>` and ends with `</answer>`;
    (b) think/search/info/answer tags are balanced, never nested, each closed before the next opens;
    (c) exactly one `<answer>` block, at least one `<think>` block, no empty or blank `<think>`;
    (d) as many `<search>` as `<info>` blocks, each `<search>` followed (only whitespace between)
        by an `<info>` block;
    (e) each `<search>` holds `Name: query`, split on the first colon, `Name` stripped equal to a
        candidate name case-insensitively (never a substring match), the stripped query non-empty.
    """
    return 0.0 if not format_errors(response, candidate_names) else FORMAT_PENALTY
