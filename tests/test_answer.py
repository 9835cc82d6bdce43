"""Tests of rewards/answer.py: SQuAD normalization, exact match, token F1 and answer extraction."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rewards import exact_match, extract_answer, f1_score, normalize_answer

MB = 1 << 20


# --- normalize_answer ---------------------------------------------------------------------------

def test_normalize_lowercases():
    assert normalize_answer("PaRiS") == "paris"


def test_normalize_drops_ascii_punctuation():
    # punctuation inside a token joins its halves (SQuAD behaviour), it does not split them
    assert normalize_answer("U.S.A.!") == "usa"
    assert normalize_answer("rock-n-roll, (live)") == "rocknroll live"


def test_normalize_drops_articles_as_whole_words_only():
    # "a", "an", "the" go; words that merely contain them ("theatre", "Anna", "bath") stay
    assert normalize_answer("The cat and a dog, an owl") == "cat and dog owl"
    assert normalize_answer("theatre Anna bath") == "theatre anna bath"


def test_normalize_drops_articles_revealed_by_punctuation_removal():
    # punctuation goes first, so "(the)" is an article by the time articles are removed
    assert normalize_answer("(The) end") == "end"


def test_normalize_collapses_whitespace_including_unicode_spaces():
    # tabs, newlines, NBSP and the ideographic space are all whitespace to str.split
    assert normalize_answer("  new\t\nyork\u00a0city\u3000 ") == "new york city"


def test_normalize_of_only_articles_and_punctuation_is_empty():
    assert normalize_answer(" The, a; AN! ") == ""


def test_normalize_keeps_accents_cjk_and_emoji():
    # only ASCII punctuation is dropped; non-ASCII letters and symbols are content
    assert normalize_answer("Café  北京 🎉") == "café 北京 🎉"


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["a"]])
def test_normalize_rejects_non_strings_with_type_error(bad):
    with pytest.raises(TypeError):
        normalize_answer(bad)


@given(st.text())
def test_normalize_is_idempotent_and_never_raises_on_str(s):
    once = normalize_answer(s)
    assert normalize_answer(once) == once


@given(st.text())
def test_normalize_output_has_no_surrounding_or_double_spaces(s):
    out = normalize_answer(s)
    assert out == " ".join(out.split())


# --- exact_match --------------------------------------------------------------------------------

def test_exact_match_is_one_after_normalization():
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0


def test_exact_match_is_zero_for_a_different_answer():
    assert exact_match("Eiffel", "eiffel tower") == 0.0


def test_exact_match_accepts_any_of_several_golden_answers():
    assert exact_match("NYC", ["New York City", "nyc"]) == 1.0


def test_exact_match_accepts_a_tuple_of_golden_answers():
    assert exact_match("paris", ("london", "Paris")) == 1.0


def test_exact_match_string_golden_is_one_answer_not_characters():
    # a bare string must not be iterated character by character: "p" is not a golden answer
    assert exact_match("p", "paris") == 0.0


def test_exact_match_of_empty_prediction_equals_empty_normalized_golden():
    # both sides normalize to "" -> they are equal; defined, not an error
    assert exact_match("", "the") == 1.0


def test_exact_match_returns_float():
    assert type(exact_match("a", "b")) is float


def test_exact_match_handles_accents_and_cjk():
    assert exact_match("ÉCOLE", "école") == 1.0
    assert exact_match("東京", ["東京"]) == 1.0


def test_exact_match_empty_golden_list_is_value_error():
    # an empty list would silently score every prediction 0: a data error, said loudly
    with pytest.raises(ValueError, match="empty"):
        exact_match("x", [])


@pytest.mark.parametrize("golden", [None, 5, ["ok", None], [b"x"]])
def test_exact_match_non_string_golden_is_type_error(golden):
    with pytest.raises(TypeError):
        exact_match("x", golden)


@pytest.mark.parametrize("pred", [None, 1.0, ["x"]])
def test_exact_match_non_string_prediction_is_type_error(pred):
    with pytest.raises(TypeError):
        exact_match(pred, "x")


# --- f1_score -----------------------------------------------------------------------------------

def test_f1_is_one_for_identical_answers():
    assert f1_score("Barack Obama", "barack obama") == 1.0


def test_f1_partial_overlap_is_harmonic_mean_of_precision_and_recall():
    # pred 3 tokens, gold 2, overlap 2: p = 2/3, r = 1 -> f1 = 0.8
    assert f1_score("president barack obama", "barack obama") == pytest.approx(0.8)


def test_f1_counts_repeated_tokens_by_multiset():
    # a repeated token overlaps only as often as the gold has it: p = 1/2, r = 1 -> f1 = 2/3
    assert f1_score("new new", "new") == pytest.approx(2 / 3)


def test_f1_is_zero_without_overlap():
    assert f1_score("london", "paris") == 0.0


def test_f1_takes_max_over_golden_answers():
    assert f1_score("barack obama", ["obama", "barack obama", "x"]) == 1.0


@pytest.mark.parametrize("pred,gold", [("yes", "no"), ("no", "yes it is"), ("yes it is", "yes"),
                                       ("noanswer", "no answer here"), ("No.", "no way")])
def test_f1_yes_no_noanswer_mismatch_is_zero(pred, gold):
    # "yes it is" overlaps "yes" on one token, but a yes/no question is all or nothing
    assert f1_score(pred, gold) == 0.0


def test_f1_yes_no_exact_match_is_one():
    assert f1_score("Yes!", "yes") == 1.0


def test_f1_of_two_empty_normalized_answers_is_zero():
    # no tokens on either side -> no overlap; defined as 0, never a ZeroDivisionError
    assert f1_score("the", "a") == 0.0


def test_f1_empty_golden_list_is_value_error():
    with pytest.raises(ValueError, match="empty"):
        f1_score("x", [])


def test_f1_non_string_prediction_is_type_error():
    with pytest.raises(TypeError):
        f1_score(None, "x")


@given(st.text(max_size=30), st.lists(st.text(max_size=30), min_size=1, max_size=3))
def test_f1_lies_in_unit_interval_and_is_at_least_exact_match(pred, golds):
    f1 = f1_score(pred, golds)
    assert 0.0 <= f1 <= 1.0
    # a non-empty exact match is a perfect F1
    if exact_match(pred, golds) == 1.0 and normalize_answer(pred):
        assert f1 == 1.0


# --- extract_answer -----------------------------------------------------------------------------

def test_extract_answer_returns_stripped_content():
    assert extract_answer("<think>x</think><answer>  Paris \n</answer>") == "Paris"


def test_extract_answer_takes_the_last_block():
    # the policy may restate its answer; the final block is the one that counts
    assert extract_answer("<answer>a</answer> then <answer>b</answer>") == "b"


def test_extract_answer_ignores_an_unclosed_trailing_answer():
    # a truncated last block is not an answer; the last complete one is
    assert extract_answer("<answer>a</answer><answer>b") == "a"


@pytest.mark.parametrize("text", ["", "no tags", "<answer>open only", "close only</answer>",
                                  "</answer><answer>", "<ANSWER>x</ANSWER>"])
def test_extract_answer_is_none_without_a_complete_block(text):
    # tags are exact lowercase strings; a close before its open is not a block
    assert extract_answer(text) is None


def test_extract_answer_of_empty_block_is_empty_string_not_none():
    # "answered with nothing" differs from "never answered"
    assert extract_answer("<answer> </answer>") == ""


def test_extract_answer_keeps_unicode():
    assert extract_answer("<answer>北京 🎉 café</answer>") == "北京 🎉 café"


def test_extract_answer_non_string_is_type_error():
    with pytest.raises(TypeError):
        extract_answer(None)


_ANSWER_FRAGMENTS = st.lists(st.sampled_from(["<answer>", "</answer>", "a", " ", "\n", "<", ">", "/"])).map("".join)


# random tag fragments reach the rfind corner cases far more often than random text does
@given(_ANSWER_FRAGMENTS | st.text())
def test_extract_answer_is_none_or_stripped_string(text):
    out = extract_answer(text)
    assert out is None or (isinstance(out, str) and out == out.strip())


# --- size -----------------------------------------------------------------------------------------

def test_one_megabyte_inputs_finish_fast():
    # a runaway policy can emit megabytes; scoring must stay linear
    big = ("word, the Ünïcode 北京 🎉 " * (MB // 24))[:MB]
    start = time.perf_counter()
    normalize_answer(big)
    exact_match(big, [big, "x"])
    f1_score(big, big)
    extract_answer("<answer>" + big + "</answer>" + big)
    assert time.perf_counter() - start < 10.0  # linear takes ~1 s; quadratic would take hours
