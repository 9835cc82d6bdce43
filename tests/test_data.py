"""QA data loading (jsonl/csv/parquet through `datasets`) and the seeded Router-R1 split preparation."""

import json
import logging
from pathlib import Path

import pytest

from envs.data import (
    FolderSource,
    QADataConfig,
    load_qa,
    load_qa_with_report,
    main,
    prepare_splits,
)

ROWS = [
    {"question": "who wrote hamlet", "golden_answers": ["Shakespeare", "William Shakespeare"], "qid": "a1"},
    {"question": "capital of france", "golden_answers": ["Paris"], "qid": "a2"},
]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_round_trip_keeps_questions_answers_and_ids(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", ROWS)
    got = load_qa(QADataConfig(str(path), id_column="qid"))
    assert [(e.question, e.golden_answers, e.id, e.dataset) for e in got] == [
        ("who wrote hamlet", ["Shakespeare", "William Shakespeare"], "a1", "qa"),
        ("capital of france", ["Paris"], "a2", "qa"),
    ]


def test_csv_reads_json_encoded_answer_lists_and_plain_strings(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('q,a\n"who wrote hamlet","[""Shakespeare"", ""W. Shakespeare""]"\ncapital of france,Paris\n')
    got = load_qa(QADataConfig(str(path), question_column="q", answers_column="a"))
    assert [e.golden_answers for e in got] == [["Shakespeare", "W. Shakespeare"], ["Paris"]]


def test_parquet_round_trip_with_mapped_columns(tmp_path):
    import datasets
    path = tmp_path / "qa.parquet"
    datasets.Dataset.from_list([{"text": "2+2", "gold": "4", "src": "arith", "key": 7}]).to_parquet(str(path))
    cfg = QADataConfig(str(path), question_column="text", answers_column="gold", id_column="key",
                       dataset_column="src")
    assert [e.as_dict() for e in load_qa(cfg)] == [
        {"id": "7", "question": "2+2", "golden_answers": ["4"], "dataset": "arith"}]


def test_bad_rows_are_skipped_and_reported_with_file_row_and_field(tmp_path, caplog):
    rows = [ROWS[0], {"question": "  ", "golden_answers": ["x"]}, {"question": "q3", "golden_answers": []}, ROWS[1]]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    examples, report = load_qa_with_report(QADataConfig(str(path)))
    assert [e.question for e in examples] == ["who wrote hamlet", "capital of france"]
    assert report.skipped == [f"{path} row 2: field 'question' is empty",
                              f"{path} row 3: field 'golden_answers' is an empty list"]
    with caplog.at_level(logging.WARNING, logger="envs.data"):
        load_qa(QADataConfig(str(path)))
    assert "skipped 2 of 4 rows" in caplog.text


def test_csv_empty_cell_is_reported_as_missing(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,golden_answers\nq1,a1\nq2,\n")
    _, report = load_qa_with_report(QADataConfig(str(path)))
    assert report.skipped == [f"{path} row 2: field 'golden_answers' is missing"]


def test_file_with_only_bad_rows_raises_naming_file_and_column(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q1", "golden_answers": None}] * 3)
    with pytest.raises(ValueError, match=r"qa\.jsonl: no usable rows; column 'golden_answers' is bad in 3 of 3"):
        load_qa(QADataConfig(str(path)))


def test_missing_column_raises_naming_file_and_column(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"qa\.jsonl: no column 'answers'"):
        load_qa(QADataConfig(str(path), answers_column="answers"))


def test_max_rows_keeps_the_first_good_rows(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "", "golden_answers": "x"}] + ROWS)
    assert [e.question for e in load_qa(QADataConfig(str(path), max_rows=1))] == ["who wrote hamlet"]


def fake_hub(root):
    """A folder laid out like the FlashRAG hub dataset: <subset>/<split>.jsonl."""
    sizes = {("nq", "train"): 30, ("nq", "test"): 12, ("hotpotqa", "train"): 25, ("hotpotqa", "dev"): 9,
             ("bamboogle", "test"): 4}
    for (subset, split), n in sizes.items():
        write_jsonl(root / subset / f"{split}.jsonl",
                    [{"id": f"{split}_{i}", "question": f"{subset} {split} q{i}", "golden_answers": [f"a{i}"]}
                     for i in range(n)])
    return root


def test_prepare_samples_the_requested_sizes_from_train_and_test_or_dev(tmp_path):
    source = FolderSource(fake_hub(tmp_path / "hub"))
    train, test = prepare_splits(source, ["nq", "hotpotqa"], ["nq", "hotpotqa", "bamboogle"],
                                 n_train=10, n_test=5, seed=0)
    assert [e.dataset for e in train] == ["nq"] * 10 + ["hotpotqa"] * 10
    assert [e.dataset for e in test] == ["nq"] * 5 + ["hotpotqa"] * 5 + ["bamboogle"] * 4
    assert all("dev" in e.question for e in test if e.dataset == "hotpotqa")
    assert len({e.id for e in train}) == 20 and all(e.question.endswith("?") for e in train + test)


def run_prepare(hub, out, seed):
    main(["prepare", "--source", str(hub), "--subsets", "nq,hotpotqa", "--test-subsets", "nq,bamboogle",
          "--out", str(out), "--seed", str(seed), "--n-train", "6", "--n-test", "3"])
    return (out / "train.jsonl").read_text(), (out / "test.jsonl").read_text()


def test_prepare_cli_is_deterministic_per_seed(tmp_path):
    hub = fake_hub(tmp_path / "hub")
    first = run_prepare(hub, tmp_path / "a", seed=0)
    assert run_prepare(hub, tmp_path / "b", seed=0) == first
    assert run_prepare(hub, tmp_path / "c", seed=1) != first


def test_prepare_output_loads_back_with_sizes_and_no_temp_files(tmp_path):
    hub = fake_hub(tmp_path / "hub")
    run_prepare(hub, tmp_path / "out", seed=0)
    train = load_qa(QADataConfig(str(tmp_path / "out" / "train.jsonl"), id_column="id", dataset_column="dataset"))
    test = load_qa(QADataConfig(str(tmp_path / "out" / "test.jsonl"), id_column="id", dataset_column="dataset"))
    assert (len(train), len(test)) == (12, 3 + 3)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test.jsonl", "train.jsonl"]


def test_missing_local_file_raises_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl: no such data file"):
        load_qa(QADataConfig(str(tmp_path / "nowhere.jsonl")))


@pytest.mark.parametrize("content, message", [
    (b'{"question": "q", "golden_answers": ["a"]}\n\xff\xfe bad\n', r"line 2: not UTF-8"),
    (b"", "the file is empty"),
    (b'{"question": "q", "golden_answers": ["a"]}\n{"question": \n', r"line 2: not valid JSON"),
])
def test_an_unreadable_data_file_names_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}.*{message}"):
        load_qa(QADataConfig(path=str(path)))


def test_train_without_prepared_data_says_how_to_prepare_it(tmp_path):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "train.py", "--config", "configs/ppo.yaml", "task.train_path=" +
                           str(tmp_path / "none.jsonl"), "device=cpu", "deepspeed=null"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("train.py: ") and "python -m envs.data prepare" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_question_too_long_for_the_models_context_is_refused_before_any_model_loads():
    import train
    from agents.config import load_config
    from envs.tasks import make_task
    cfg = load_config("configs/routeworld_tiny.yaml", [])
    task = make_task(cfg)
    try:
        train.check_prompt_lengths(cfg, task, task.tokenizer)  # the shipped task fits
        task.train[3] = dict(task.train[3], question="word " * 100_000)
        with pytest.raises(ValueError, match=r"train question 'routeworld-train-0003' has 300001 tokens.*context of 512"):
            train.check_prompt_lengths(cfg, task, task.tokenizer)
    finally:
        task.pool.close()
