"""The replay backend: recorded outcomes of real models (data/llmrouter, data/routellm) served to a pool."""

import csv
import json
from pathlib import Path

import pytest

from envs.candidates import load_pool
from envs.candidates.replay import (
    CORRECT_AT,
    LLMROUTER_MODELS,
    ROUTELLM_SPECS,
    Outcome,
    ReplayBackend,
    ReplayQuestion,
    ReplayTable,
    estimate_tokens,
    llmrouter_specs,
)
from rewards.answer import exact_match

ROOT = Path(__file__).resolve().parents[1]
LLMROUTER_YAML = ROOT / "configs/candidates/llmrouter_replay.yaml"
GSM8K_YAML = ROOT / "configs/candidates/routellm_gsm8k_replay.yaml"


@pytest.fixture(scope="module")
def llmrouter_pool():
    pool = load_pool(LLMROUTER_YAML)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def raw_test():
    rows = json.loads((ROOT / "data/llmrouter/test.json").read_text())
    lines = (ROOT / "data/llmrouter/default_query_test.jsonl").read_text().splitlines()
    golden = {r["query"]: r["ground_truth"] for r in map(json.loads, lines)}
    return rows, golden


def name_of(short_name):
    return LLMROUTER_MODELS[short_name][0]


def test_yaml_pools_list_the_loaders_specs():
    assert load_pool(LLMROUTER_YAML).specs == llmrouter_specs(ROOT / "data/llmrouter")
    assert load_pool(GSM8K_YAML).specs == list(ROUTELLM_SPECS)


def test_llmrouter_replay_returns_the_recorded_outcome_of_each_model(llmrouter_pool, raw_test):
    rows, golden = raw_test
    # A handful of rows across tasks: logic grid, mgsm, natural_qa, trivia_qa, mmlu.
    for row in (rows[0], rows[60], rows[160], rows[210], rows[299]):
        calls = [(name_of(m), "some sub-question", row["question"]) for m in row["scores"]]
        for (m, score), record in zip(row["scores"].items(), llmrouter_pool.call_many(calls)):
            assert record.error is None
            assert exact_match(record.reply, golden[row["question"]]) == float(score >= CORRECT_AT), (m, row["question"])


def test_llmrouter_calls_are_charged_the_typical_length_at_the_file_price(llmrouter_pool, raw_test):
    rows, _ = raw_test
    record = llmrouter_pool.call(name_of("gemma-2-9b-it"), "q", rows[160]["question"])
    assert (record.completion_tokens, record.price_per_1m_output) == (100, 0.1)


def test_replay_reads_the_query_when_the_episode_question_is_empty(llmrouter_pool, raw_test):
    rows, golden = raw_test
    row = rows[160]
    model = next(m for m, s in row["scores"].items() if s >= CORRECT_AT)
    assert llmrouter_pool.call(name_of(model), row["question"], "").reply == golden[row["question"]]


def test_wrong_answers_are_deterministic_and_never_golden(raw_test):
    rows, golden = raw_test
    pools = [load_pool(LLMROUTER_YAML) for _ in range(2)]
    calls = [(name_of(m), "q", r["question"]) for r in rows for m, s in r["scores"].items() if s < CORRECT_AT]
    first, second = (p.call_many(calls) for p in pools)
    assert [r.reply for r in first] == [r.reply for r in second]
    assert all(r.reply and exact_match(r.reply, golden[q]) == 0.0 for r, (_, _, q) in zip(first, calls))
    for p in pools:
        p.close()


def test_wrong_answer_depends_on_the_seed_only_through_the_stable_hash():
    golden = {f"q{i}": f"answer {i}" for i in range(50)}
    table = ReplayTable({q: ReplayQuestion(q, [a], "toy", {"m": Outcome(0.0)}) for q, a in golden.items()},
                        typical_tokens={"m": 10})
    draws = [[ReplayBackend(table, seed=s).wrong_answer(table.questions[q], "m") for q in golden] for s in (0, 0, 1)]
    assert draws[0] == draws[1] and draws[0] != draws[2]


def test_gsm8k_replay_returns_recorded_response_text_verbatim():
    with open(ROOT / "data/routellm/gsm8k_responses.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:5]
    pool = load_pool(GSM8K_YAML)
    for spec in pool.specs:
        records = pool.call_many([(spec.name, "rephrased sub-question", r["prompt"]) for r in rows])
        assert [rec.reply for rec in records] == [r[spec.model + "_response"] for r in rows]
        assert [rec.completion_tokens for rec in records] == [estimate_tokens(r[spec.model + "_response"]) for r in rows]
    pool.close()


def test_unknown_question_becomes_an_error_record_not_an_exception(llmrouter_pool):
    question = "Which candidate was never asked this question at all? " * 3
    [record] = llmrouter_pool.call_many([(name_of("codegemma-7b"), "q", question)])
    assert record.error == f"replay: no recorded outcomes for question {question.strip()[:80]!r}"
    assert (record.reply, record.cost) == ("", 0.0)


def test_train_question_without_golden_answer_is_an_error_record(llmrouter_pool):
    question = json.loads((ROOT / "data/llmrouter/train.json").read_text())[0]["question"]
    record = llmrouter_pool.call(name_of("codegemma-7b"), "q", question)
    assert "no recorded response and no golden answer" in record.error


def test_candidate_whose_model_has_no_outcomes_is_rejected_at_load():
    cfg = {"backend": {"kind": "replay", "source": "routellm_gsm8k", "data_dir": "data/routellm"},
           "candidates": [{"name": "Other", "model": "org/other", "params_b": 1, "price_per_1m_output": 1}]}
    with pytest.raises(ValueError, match="'org/other' has no outcomes in replay source 'routellm_gsm8k'"):
        load_pool(cfg)


def test_recorded_token_count_wins_over_the_estimate():
    table = ReplayTable({"q": ReplayQuestion("q", ["a"], "toy", {"m": Outcome(1.0, "a long reply here", 7)})})
    pool = load_pool({"candidates": [{"name": "M", "model": "m", "params_b": 1, "price_per_1m_output": 1}]},
                     backend=ReplayBackend(table))
    assert pool.call("M", "anything", "q").completion_tokens == 7
    pool.close()
