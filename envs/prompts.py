"""The policy's prompt: the rules, a block describing each candidate (generated from the specs) and
the question, rendered with the tokenizer's chat template when it has one."""

from __future__ import annotations

from typing import Sequence

from envs.candidates.spec import CandidateSpec

# Our wording of the Router-R1 instructions (one user message, as in the paper).
ROUTER_R1_TEMPLATE = """\
Answer the question below. Think step by step inside <think> and </think> every time you receive \
new information. When you need help, ask one of the candidate models a sub-question by writing \
<search> Model-Name: sub-question </search>; its reply comes back between <info> and </info>. \
You may ask up to {max_turns} times, choosing each time the model that suits the sub-question, and \
keep in mind that each call costs money. When you are ready, give the final answer, as short as \
possible (a few words, no explanation), inside <answer> and </answer>.

Candidate models:
{candidates}

{conditions}Question: {question}
"""

# A short form for tiny models trained from scratch (RouteWorld): same rules, fewer tokens.
COMPACT_TEMPLATE = """\
Candidates:
{candidates}
{conditions}Question: {question}
"""

TEMPLATES = {"router_r1": ROUTER_R1_TEMPLATE, "compact": COMPACT_TEMPLATE}


def candidate_block(specs: Sequence[CandidateSpec], compact: bool = False) -> str:
    """One line per candidate: name, size, output price per 1M tokens and description."""
    lines = []
    for s in specs:
        size = f"{s.params_b:g}B"
        price = f"${s.price_per_1m_output:g}/M"
        if compact:  # name and price only: a tiny model learns who is good at what from the reward
            lines.append(f"{s.name} {price}")
        else:
            desc = f": {s.description}" if s.description else ""
            lines.append(f"- {s.name} ({size} parameters, {price} output tokens){desc}")
    return "\n".join(lines)


def condition_text(alpha: float | None = None, max_cost: float | None = None) -> str:
    """The fixed words that state an episode's cost weight and spending cap (empty when neither is
    stated, so an unconditioned prompt is unchanged), e.g. "Cost weight: 0.5. Budget: 40 micro-$."."""
    parts = ([f"Cost weight: {alpha:g}."] if alpha is not None else []) + \
            ([f"Budget: {max_cost:g} micro-$."] if max_cost is not None else [])
    return " ".join(parts) + "\n" if parts else ""


def build_prompt(question: str, specs: Sequence[CandidateSpec], template: str = "router_r1",
                 max_turns: int = 4, alpha: float | None = None, max_cost: float | None = None) -> str:
    """The user message: `template` is a name in TEMPLATES or a format string with {candidates},
    {question} and optionally {max_turns} and {conditions}. `alpha` (a conditioned policy's cost
    weight) and `max_cost` (a spending cap) are stated by `condition_text` where {conditions}
    stands; a template without it cannot state them, which is an error when either is given."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    fmt = TEMPLATES.get(template, template)
    if "{question}" not in fmt or "{candidates}" not in fmt:
        raise ValueError(f"prompt template {template!r} must be a known name {sorted(TEMPLATES)} "
                         "or a format string with {candidates} and {question}")
    conditions = condition_text(alpha, max_cost)
    if conditions and "{conditions}" not in fmt:
        raise ValueError(f"prompt template {template!r} has no {{conditions}} field, so it cannot state the "
                         "cost weight or budget of a conditioned or capped episode; add {conditions}")
    return fmt.format(candidates=candidate_block(specs, compact=template == "compact"),
                      question=question.strip(), max_turns=max_turns, conditions=conditions)


def prompt_token_ids(tokenizer, user_messages: list[str]) -> list[list[int]]:
    """Token ids of each prompt, in one batched call. With a chat template: one user message and the
    generation prompt, so the whole trajectory (`<info>` blocks included) stays inside the assistant
    turn. Without one: the message text itself."""
    if not user_messages:
        return []
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([[{"role": "user", "content": m}] for m in user_messages],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [list(x) for x in ids]
    return tokenizer(list(user_messages), add_special_tokens=False)["input_ids"]
