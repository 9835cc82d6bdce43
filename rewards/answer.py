"""Answer normalization, exact match, token F1 (SQuAD conventions) and answer extraction."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

from rewards.tags import ANSWER, close_tag, open_tag

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_YES_NO = ("yes", "no", "noanswer")


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lowercase, drop ASCII punctuation, drop the whole-word articles
    a/an/the, collapse runs of whitespace to one space (and strip the ends)."""
    if not isinstance(s, str):
        raise TypeError(f"normalize_answer expects str, got {type(s).__name__}")
    s = s.lower().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _golden_list(golden_answers: str | Sequence[str]) -> list[str]:
    if isinstance(golden_answers, str):
        return [golden_answers]
    if golden_answers is None or not isinstance(golden_answers, Sequence):
        raise TypeError(f"golden_answers must be a str or a sequence of str, got {type(golden_answers).__name__}")
    if len(golden_answers) == 0:
        raise ValueError("golden_answers is empty: at least one golden answer is needed")
    for i, g in enumerate(golden_answers):
        if not isinstance(g, str):
            raise TypeError(f"golden_answers[{i}] must be str, got {type(g).__name__}")
    return list(golden_answers)


def _check_prediction(prediction: str) -> None:
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be str, got {type(prediction).__name__}")


def exact_match(prediction: str, golden_answers: str | Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized golden answer, else 0.0."""
    _check_prediction(prediction)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _golden_list(golden_answers)))


def _f1(pred: str, gold: str) -> float:
    # SQuAD v1.1 / HotpotQA: a yes/no/noanswer on either side must match exactly.
    if (pred in _YES_NO or gold in _YES_NO) and pred != gold:
        return 0.0
    pred_tokens, gold_tokens = pred.split(), gold.split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golden_answers: str | Sequence[str]) -> float:
    """Token-level F1 of the normalized prediction against each normalized golden answer, max over
    golden answers; 0.0 when either side is one of yes/no/noanswer and the two differ."""
    _check_prediction(prediction)
    pred = normalize_answer(prediction)
    return max(_f1(pred, normalize_answer(g)) for g in _golden_list(golden_answers))


def extract_answer(response: str) -> str | None:
    """The stripped content of the LAST `<answer>...</answer>` block of `response`, or None."""
    if not isinstance(response, str):
        raise TypeError(f"extract_answer expects str, got {type(response).__name__}")
    end = response.rfind(close_tag(ANSWER))
    if end < 0:
        return None
    start = response.rfind(open_tag(ANSWER), 0, end)
    if start < 0:
        return None
    return response[start + len(open_tag(ANSWER)):end].strip()
