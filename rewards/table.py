"""The one Markdown table writer of the project (train.py's final table, evaluate.py's results.md,
the benchmarks' tables): a header and rows of cells in, the table's text out."""

from __future__ import annotations

from typing import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """`| a | b |` lines: the header, the `|---|---|` rule, then one line per row, each cell as
    `str(cell)` (format numbers before passing them). No trailing newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
