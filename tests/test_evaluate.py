"""evaluate.py end to end on a small offline file (questions replayed from data/llmrouter), and its
refusal of bad input before anything is written."""

from __future__ import annotations

import csv
import json

import matplotlib.image
import pytest
import yaml

import evaluate

POOL = "configs/candidates/llmrouter_replay.yaml"
QUESTIONS = [  # (question, golden answer) rows of data/llmrouter/default_query_test.jsonl
    json.loads(line) for line in open("data/llmrouter/default_query_test.jsonl", encoding="utf-8")
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path, test_file, **extra):
    cfg = {"task": "qa", "pool": POOL, "test_files": [{"path": str(test_file), "dataset_column": "task"}],
           "episode": {"max_response_tokens": 4096}, "bootstrap_resamples": 50, **extra}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def small_file(tmp_path):
    test_qs = {r["question"].strip() for r in json.load(open("data/llmrouter/test.json"))}
    rows = [{"question": r["query"], "golden_answers": [str(r["ground_truth"])], "task": r["task_name"]}
            for r in QUESTIONS if r["query"].strip() in test_qs][::25][:12]
    return write_jsonl(tmp_path / "small.jsonl", rows)


def test_three_routers_end_to_end(tmp_path, small_file):
    out = tmp_path / "out"
    result = evaluate.main(["--config", str(config(tmp_path, small_file)), "--routers", "largest,cheapest,oracle",
                            "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "results.csv", "results.json", "results.md"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["routers"] == ["largest", "cheapest", "oracle"] and saved["n_questions"] == 12
    overall = {r["router"]: r["metrics"]["by_dataset"]["overall"] for r in saved["rows"]}
    assert overall["oracle"]["em"] >= max(overall["largest"]["em"], overall["cheapest"]["em"])
    assert overall["cheapest"]["raw_cost"] == pytest.approx(100 * 0.1)  # 100 tokens at Gemma's 0.1 $/M
    assert all(o["calls_per_question"] == 1.0 and o["format_error_rate"] == 0.0 for o in overall.values())
    assert saved["routing_score_bounds"]["oracle"] >= max(r["metrics"]["routing_score"] for r in saved["rows"]) - 1e-9
    table = (out / "results.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:5]] == ["largest", "cheapest", "oracle"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["router"] for r in rows if r["dataset"] == "overall"} == {"largest", "cheapest", "oracle"}
    image = matplotlib.image.imread(out / "pareto.png")
    assert image.ndim == 3 and image.shape[0] > 100
    assert result["curves"]["oracle"]["aiq"] == pytest.approx(overall["oracle"]["em"])


@pytest.mark.parametrize("rows, message", [
    ([{"question": "q?", "golden_answers": []}], r"row 1: field 'golden_answers' .*non-empty list"),
    ([{"question": "q?", "golden_answers": ["a"]}, {"question": 42, "golden_answers": ["a"]}],
     r"row 2: field 'question' is 42 \(int\), expected a string"),
    ([{"query": "q?", "golden_answers": ["a"]}], r"no column 'question'"),
])
def test_bad_rows_stop_before_anything_is_written(tmp_path, rows, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = config(tmp_path, bad)
    with open(cfg) as f:
        data = yaml.safe_load(f)
    data["test_files"][0].pop("dataset_column")
    cfg.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message) as e:
        evaluate.main(["--config", str(cfg), "--routers", "cheapest", "--out", str(out)])
    assert "bad.jsonl" in str(e.value)
    assert not out.exists()


def test_unknown_router_stops_before_anything_is_written(tmp_path, small_file):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown router 'bogus'.*known: .*cheapest"):
        evaluate.main(["--config", str(config(tmp_path, small_file)), "--routers", "cheapest,bogus", "--out", str(out)])
    assert not out.exists()


def test_unknown_config_key_is_an_error(tmp_path, small_file):
    with pytest.raises(ValueError, match="unknown config key"):
        evaluate.load_eval_config(config(tmp_path, small_file), ["routers.nope=1"])
