"""The one Markdown table writer."""

from rewards.table import markdown_table


def test_markdown_table_has_a_header_rule_and_one_line_per_row():
    text = markdown_table(["router", "EM"], [["knn", "0.500"], ["fixed: A", 1]])
    assert text == "| router | EM |\n|---|---|\n| knn | 0.500 |\n| fixed: A | 1 |"


def test_a_table_without_rows_is_its_header():
    assert markdown_table(["a"], []) == "| a |\n|---|"
