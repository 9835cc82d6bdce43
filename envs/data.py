"""Question-answer data: read QA rows from local files or the Hugging Face hub, and prepare the
Router-R1 train/test splits (`python -m envs.data prepare ...`)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

import numpy as np

from envs.atomic import write_atomic

log = logging.getLogger(__name__)

# File suffix -> the `datasets` builder that reads it.
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class QAExample:
    """One question with its accepted answers; `dataset` names the benchmark it came from."""

    question: str
    golden_answers: list[str]
    id: str
    dataset: str

    def as_dict(self) -> dict:
        return {"id": self.id, "question": self.question, "golden_answers": list(self.golden_answers),
                "dataset": self.dataset}


@dataclass
class QADataConfig:
    """Where QA rows come from and which columns hold what."""

    path: str  # a local .jsonl/.json/.parquet/.csv file, or a hub dataset name
    split: str = "train"  # hub split; a local file is read whole
    subset: str | None = None  # hub configuration name (e.g. "nq" in RUC-NLPIR/FlashRAG_datasets)
    question_column: str = "question"
    answers_column: str = "golden_answers"  # a list of strings, one string, or (csv) a JSON-encoded list
    id_column: str | None = None  # None: ids are "<dataset>-<row>"
    dataset_column: str | None = None  # None: every row gets `dataset_name`
    dataset_name: str | None = None  # None: the file's stem, or the hub subset/name
    max_rows: int | None = None  # keep the first max_rows good rows; None keeps all

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"QADataConfig.path must be a non-empty string, got {self.path!r}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"QADataConfig.max_rows must be >= 1 or None, got {self.max_rows}")
        if not self.question_column or not self.answers_column:
            raise ValueError("QADataConfig.question_column and answers_column must be non-empty")


@dataclass
class LoadReport:
    """What `load_qa_with_report` read: rows seen, rows kept, and one message per skipped row."""

    source: str
    rows_read: int = 0
    kept: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


class _BadRow(ValueError):
    """A row field is missing or empty; `column` names the field."""

    def __init__(self, column: str, why: str):
        super().__init__(why)
        self.column = column


def _is_local(path: str) -> bool:
    return Path(path).suffix.lower() in _FORMATS or Path(path).exists()


def _open_source(cfg: QADataConfig):
    """The rows as a `datasets.Dataset`, and a name for messages (the file path or the hub id)."""
    import datasets  # here, not at the top: it takes a second to import, and QAExample users skip it
    if _is_local(cfg.path):
        path = Path(cfg.path)
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(_FORMATS)}")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such data file")
        _check_text_file(path)
        try:
            return datasets.load_dataset(fmt, data_files=str(path), split="train"), str(path)
        except Exception as e:  # the reader's own errors name neither the file nor the row
            raise ValueError(f"{path}: could not be read as {fmt} ({type(e).__name__}: {str(e)[:300]})") from None
    where = f"{cfg.path}[{cfg.subset}]" if cfg.subset else cfg.path
    return datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split), f"{where} split {cfg.split!r}"


def _check_text_file(path: Path) -> None:
    """A local text data file must be non-empty UTF-8, and a .jsonl file one JSON object per line;
    errors name the file and the line."""
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        return
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{path}: the file is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None


def _text(value: object, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # csv readers give NaN
        raise _BadRow(column, "is missing")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _BadRow(column, f"is a {type(value).__name__}, expected text")
    text = str(value).strip()
    if not text:
        raise _BadRow(column, "is empty")
    return text


def _answers(value: object, column: str) -> list[str]:
    """Golden answers from a list, a single string, or a JSON-encoded list (how csv stores lists)."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a plain answer that happens to start with "["
    if isinstance(value, (list, tuple)):
        answers = [_text(v, f"{column}[{i}]") for i, v in enumerate(value)]
        if not answers:
            raise _BadRow(column, "is an empty list")
        return answers
    return [_text(value, column)]


def _example(row: Mapping, cfg: QADataConfig, default_dataset: str, row_no: int) -> QAExample:
    question = _text(row.get(cfg.question_column), cfg.question_column)
    answers = _answers(row.get(cfg.answers_column), cfg.answers_column)
    dataset = _text(row.get(cfg.dataset_column), cfg.dataset_column) if cfg.dataset_column else default_dataset
    qid = _text(row.get(cfg.id_column), cfg.id_column) if cfg.id_column else f"{dataset}-{row_no}"
    return QAExample(question, answers, qid, dataset)


def load_qa_with_report(cfg: QADataConfig) -> tuple[list[QAExample], LoadReport]:
    """Read QA rows; skip bad rows and say which.

    Rule: a row whose question, answers, or (when configured) id/dataset field is missing or empty is
    skipped and reported as "<source> row <n>: field '<column>' <why>", n counting data rows from 1
    (the line of a jsonl file without blank lines; the line after the header of a csv file). A
    configured column absent from the file, or a file where every row is bad, raises ValueError naming
    the source and the column.
    """
    table, source = _open_source(cfg)
    needed = [c for c in (cfg.question_column, cfg.answers_column, cfg.id_column, cfg.dataset_column) if c]
    for column in needed:
        if column not in table.column_names:
            raise ValueError(f"{source}: no column {column!r}; columns are {table.column_names}")
    default_dataset = cfg.dataset_name or (Path(cfg.path).stem if _is_local(cfg.path) else (cfg.subset or cfg.path))
    report = LoadReport(source)
    examples: list[QAExample] = []
    bad_columns: dict[str, int] = {}
    for row_no, row in enumerate(table, start=1):
        report.rows_read += 1
        try:
            examples.append(_example(row, cfg, default_dataset, row_no))
        except _BadRow as e:
            report.skipped.append(f"{source} row {row_no}: field {e.column!r} {e}")
            root = e.column.split("[")[0]
            bad_columns[root] = bad_columns.get(root, 0) + 1
        if cfg.max_rows is not None and len(examples) >= cfg.max_rows:
            break
    report.kept = len(examples)
    if not examples:
        worst = max(bad_columns, key=bad_columns.get) if bad_columns else cfg.question_column
        first = report.skipped[0] if report.skipped else "the file has no rows"
        raise ValueError(f"{source}: no usable rows; column {worst!r} is bad in {bad_columns.get(worst, 0)} of "
                         f"{report.rows_read} rows (first: {first})")
    return examples, report


def load_qa(cfg: QADataConfig) -> list[QAExample]:
    """`load_qa_with_report` that logs a warning with the count (and the first few) of skipped rows."""
    examples, report = load_qa_with_report(cfg)
    if report.skipped:
        shown = "; ".join(report.skipped[:5])
        log.warning("%s: skipped %d of %d rows: %s%s", report.source, report.n_skipped, report.rows_read,
                    shown, " ..." if report.n_skipped > 5 else "")
    return examples


def write_jsonl(path: str | Path, rows: Iterable[Mapping]) -> None:
    """Write rows as JSON lines, atomically (`write_atomic`)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_atomic(path, write)


# ---------------------------------------------------------------------------------------------------
# Preparing the Router-R1 splits.
#
# The paper trains on NQ + HotpotQA train questions and tests on seven QA sets, taking the FlashRAG
# copies of each. Per subset we draw min(n, size) rows without replacement; tests use the "test" split
# where it exists and "dev" otherwise (Bamboogle has 125 questions, so it is kept whole). Each subset
# draws from its own generator keyed by (seed, subset name), so adding a subset leaves the others'
# samples unchanged.

TRAIN_SUBSETS = ("nq", "hotpotqa")
TEST_SUBSETS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
TEST_SPLITS = ("test", "dev")


class QASource(Protocol):
    """Where `prepare` reads subsets from: the hub, or a local folder laid out like it."""

    def splits(self, subset: str) -> list[str]: ...

    def load(self, subset: str, split: str) -> list[QAExample]: ...


@dataclass
class HubSource:
    """A hub dataset with one configuration per subset (like RUC-NLPIR/FlashRAG_datasets)."""

    name: str

    def splits(self, subset: str) -> list[str]:
        import datasets
        return list(datasets.get_dataset_split_names(self.name, subset))

    def load(self, subset: str, split: str) -> list[QAExample]:
        return load_qa(QADataConfig(self.name, split=split, subset=subset, id_column="id", dataset_name=subset))


@dataclass
class FolderSource:
    """A local folder holding `<subset>/<split>.jsonl` files with the FlashRAG columns."""

    root: Path

    def splits(self, subset: str) -> list[str]:
        return sorted(p.stem for p in (Path(self.root) / subset).glob("*.jsonl"))

    def load(self, subset: str, split: str) -> list[QAExample]:
        path = Path(self.root) / subset / f"{split}.jsonl"
        return load_qa(QADataConfig(str(path), id_column="id", dataset_name=subset))


def open_source(source: str) -> QASource:
    """A local folder if `source` is an existing directory, else a hub dataset name."""
    return FolderSource(Path(source)) if Path(source).is_dir() else HubSource(source)


def _subset_rng(seed: int, subset: str) -> np.random.Generator:
    # A stable key per subset (Python's hash() is salted per process, so it is not used).
    key = int.from_bytes(hashlib.sha256(subset.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, key])


def _prepared(ex: QAExample, subset: str) -> QAExample:
    """The row as written: ids prefixed by the subset (FlashRAG ids like "train_0" repeat across
    subsets), and the question ending in "?" as Router-R1's preparation makes it."""
    q = ex.question if ex.question.endswith("?") else ex.question + "?"
    return QAExample(q, ex.golden_answers, f"{subset}/{ex.id}", subset)


def sample_subset(examples: Sequence[QAExample], n: int | None, rng: np.random.Generator) -> list[QAExample]:
    """min(n, len) examples drawn without replacement in the drawn order; n=None keeps all, in order."""
    if n is None or n >= len(examples):
        return list(examples)
    picks = rng.choice(len(examples), size=n, replace=False)
    return [examples[int(i)] for i in picks]


def prepare_splits(
    source: QASource,
    train_subsets: Sequence[str] = TRAIN_SUBSETS,
    test_subsets: Sequence[str] = TEST_SUBSETS,
    n_train: int | None = 7000,
    n_test: int | None = 500,
    seed: int = 0,
) -> tuple[list[QAExample], list[QAExample]]:
    """The Router-R1 train set (n_train per train subset, from "train") and test set (n_test per test
    subset, from "test" or else "dev"), sampled reproducibly from `seed`."""
    train: list[QAExample] = []
    for subset in train_subsets:
        if "train" not in source.splits(subset):
            raise ValueError(f"{source}: subset {subset!r} has no 'train' split")
        rows = sample_subset(source.load(subset, "train"), n_train, _subset_rng(seed, f"train/{subset}"))
        train += [_prepared(ex, subset) for ex in rows]
    test: list[QAExample] = []
    for subset in test_subsets:
        have = source.splits(subset)
        split = next((s for s in TEST_SPLITS if s in have), None)
        if split is None:
            raise ValueError(f"{source}: subset {subset!r} has none of the splits {TEST_SPLITS}; it has {have}")
        rows = sample_subset(source.load(subset, split), n_test, _subset_rng(seed, f"test/{subset}"))
        test += [_prepared(ex, subset) for ex in rows]
    return train, test


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m envs.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="sample the Router-R1 train/test jsonl files")
    prep.add_argument("--source", default="RUC-NLPIR/FlashRAG_datasets",
                      help="hub dataset name, or a local folder of <subset>/<split>.jsonl files")
    prep.add_argument("--subsets", default=",".join(TRAIN_SUBSETS), help="comma-separated train subsets")
    prep.add_argument("--test-subsets", default=",".join(TEST_SUBSETS), help="comma-separated test subsets")
    prep.add_argument("--out", default="data/", help="folder for train.jsonl and test.jsonl")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--n-train", type=int, default=7000, help="questions per train subset (0: all)")
    prep.add_argument("--n-test", type=int, default=500, help="questions per test subset (0: all)")
    args = parser.parse_args(argv)

    train, test = prepare_splits(open_source(args.source), _names(args.subsets), _names(args.test_subsets),
                                 args.n_train or None, args.n_test or None, args.seed)
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", (ex.as_dict() for ex in train))
    write_jsonl(out / "test.jsonl", (ex.as_dict() for ex in test))
    print(f"wrote {len(train)} train and {len(test)} test questions to {out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
