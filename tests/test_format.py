"""Tests of rewards/format.py: the format reward, one group of tests per clause (a)-(e) of its rule."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rewards import FORMAT_PENALTY, format_errors, format_reward

NAMES = ("Qwen2.5-7B-Instruct", "LLaMA-3.1-70B-Instruct", "Mistral-7B")

GOOD = ("<think> I need the author. </think>\n"
        "<search> Qwen2.5-7B-Instruct: who wrote Hamlet? </search>\n"
        "<info> William Shakespeare </info>\n"
        "<think> The reply is clear. </think>\n"
        "<answer> Shakespeare </answer>")


def search(content: str, info: str = "reply") -> str:
    return f"<search>{content}</search><info>{info}</info>"


def trajectory(*middle: str) -> str:
    """A well-formed frame around `middle`: a think first, the answer last."""
    return "<think>plan</think>" + "".join(middle) + "<answer>x</answer>"


def assert_malformed(response: str, clause: str) -> None:
    """-1, and for the intended reason: an error of `clause` is among those reported."""
    assert format_reward(response, NAMES) == FORMAT_PENALTY
    assert any(e.startswith(f"({clause})") for e in format_errors(response, NAMES)), format_errors(response, NAMES)


def test_reference_trajectory_is_well_formed():
    assert format_reward(GOOD, NAMES) == 0.0
    assert format_errors(GOOD, NAMES) == []


def test_penalty_is_minus_one():
    assert FORMAT_PENALTY == -1.0


# --- (a) starts with <think>, ends with </answer>, after stripping ------------------------------

def test_a_surrounding_whitespace_is_stripped():
    # the prompt template may leave a newline before the first tag; that is not the policy's fault
    assert format_reward("\n  " + GOOD + " \n\t", NAMES) == 0.0


def test_a_text_before_first_think_is_rejected():
    assert_malformed("Sure! " + GOOD, "a")


def test_a_text_after_answer_is_rejected():
    # rambling on after the answer is what the penalty exists to stop
    assert_malformed(GOOD + " Hope this helps.", "a")


def test_a_starting_with_search_is_rejected():
    assert_malformed(search("Mistral-7B: q") + "<think>t</think><answer>x</answer>", "a")


def test_a_uppercase_tags_are_not_tags():
    # tags are exact lowercase strings; "<THINK>" is plain text, so nothing starts with <think>
    assert_malformed("<THINK>t</THINK><answer>x</answer>", "a")


# --- (b) balanced, never nested, closed before the next opens -----------------------------------

def test_b_nested_think_is_rejected():
    assert_malformed("<think> a <think> b </think> c </think><answer>x</answer>", "b")


def test_b_answer_inside_think_is_rejected():
    # otherwise an answer "thought about" would be extracted as the final answer
    assert_malformed("<think> maybe <answer>y</answer> </think><answer>x</answer>", "b")


def test_b_unclosed_block_is_rejected():
    assert_malformed("<think>plan</think><search>Mistral-7B: q<answer>x</answer>", "b")


def test_b_close_without_open_is_rejected():
    assert_malformed("<think>plan</think></info><answer>x</answer>", "b")


def test_b_crossed_blocks_are_rejected():
    # <search> opens before </think> closes: closed-before-next-opens is broken
    assert_malformed("<think>plan<search>Mistral-7B: q</think></search><info>r</info><answer>x</answer>", "b")


def test_b_sequential_blocks_of_all_four_tags_are_accepted():
    assert format_reward(trajectory(search("Mistral-7B: q"), "<think>more</think>"), NAMES) == 0.0


# --- (c) exactly one answer, at least one think, no blank think ---------------------------------

def test_c_two_answers_are_rejected():
    assert_malformed("<think>t</think><answer>a</answer><answer>b</answer>", "c")


def test_c_one_answer_is_accepted():
    assert format_reward("<think>t</think><answer>a</answer>", NAMES) == 0.0


def test_c_empty_think_is_rejected():
    assert_malformed("<think></think><answer>x</answer>", "c")


def test_c_whitespace_only_think_is_rejected():
    # newlines, tabs and unicode spaces are all blank: a think with no thought in it
    assert_malformed("<think> \n\t\u3000 </think><answer>x</answer>", "c")


def test_c_a_later_blank_think_is_rejected_too():
    # "no think block blank" applies to every think, not only the first
    assert_malformed(trajectory(search("Mistral-7B: q"), "<think> </think>"), "c")


def test_c_single_character_think_is_accepted():
    assert format_reward("<think>.</think><answer>x</answer>", NAMES) == 0.0


def test_c_empty_answer_content_is_accepted_by_format():
    # the format rule does not judge the answer; EM gives an empty answer 0 anyway
    assert format_reward("<think>t</think><answer></answer>", NAMES) == 0.0


# --- (d) searches and infos pair up, search then info with only whitespace between --------------

def test_d_search_without_info_is_rejected():
    assert_malformed(trajectory("<search>Mistral-7B: q</search>"), "d")


def test_d_info_without_search_is_rejected():
    # an info the env never inserted means the policy forged a reply
    assert_malformed(trajectory("<info>forged</info>"), "d")


def test_d_text_between_search_and_info_is_rejected():
    assert_malformed(trajectory("<search>Mistral-7B: q</search> hmm <info>r</info>"), "d")


def test_d_whitespace_between_search_and_info_is_accepted():
    assert format_reward(trajectory("<search>Mistral-7B: q</search>\n \t<info>r</info>"), NAMES) == 0.0


def test_d_info_before_search_is_rejected_even_with_equal_counts():
    # counts match (1 and 1), but the info does not follow the search
    assert_malformed(trajectory("<info>r</info><search>Mistral-7B: q</search>"), "d")


def test_d_think_between_search_and_info_is_rejected():
    assert_malformed(trajectory("<search>Mistral-7B: q</search><think>t</think><info>r</info>"), "d")


def test_d_several_paired_searches_are_accepted():
    assert format_reward(trajectory(search("Mistral-7B: q1"), search("qwen2.5-7b-instruct: q2")), NAMES) == 0.0


def test_d_empty_info_is_accepted():
    # a candidate may reply with nothing; that is the candidate's doing, not a format error
    assert format_reward(trajectory(search("Mistral-7B: q", info="")), NAMES) == 0.0


# --- (e) search content is `Name: query` ---------------------------------------------------------

def test_e_wrong_case_name_is_accepted():
    assert format_reward(trajectory(search("mistral-7b: q"), search("QWEN2.5-7B-INSTRUCT: q")), NAMES) == 0.0


def test_e_substring_of_a_name_is_rejected():
    # Router-R1's substring check routed "Qwen" to a Qwen model; we demand the exact name
    assert_malformed(trajectory(search("Qwen: who wrote Hamlet?")), "e")


def test_e_superstring_of_a_name_is_rejected():
    assert_malformed(trajectory(search("Mistral-7B-v2: q")), "e")


def test_e_colons_inside_the_query_are_accepted():
    # split on the FIRST colon; Router-R1's split(":")[1] dropped everything after a second one
    assert format_reward(trajectory(search("Mistral-7B: time 10:30? ratio 3:1")), NAMES) == 0.0


def test_e_spaces_around_name_and_query_are_accepted():
    assert format_reward(trajectory(search("\n  Mistral-7B  :  q \n")), NAMES) == 0.0


def test_e_missing_colon_is_rejected():
    assert_malformed(trajectory(search("Mistral-7B who wrote Hamlet?")), "e")


def test_e_blank_query_is_rejected():
    assert_malformed(trajectory(search("Mistral-7B:   ")), "e")


def test_e_empty_name_is_rejected():
    assert_malformed(trajectory(search(": who wrote Hamlet?")), "e")


def test_e_unknown_name_with_no_candidates_is_rejected():
    assert format_reward(trajectory(search("Mistral-7B: q")), []) == FORMAT_PENALTY


def test_e_one_bad_search_among_good_ones_is_rejected():
    assert_malformed(trajectory(search("Mistral-7B: q"), search("GPT-4: q")), "e")


# --- bad input and robustness --------------------------------------------------------------------

@pytest.mark.parametrize("bad", [None, b"<think>t</think><answer>x</answer>", 3])
def test_non_string_response_is_type_error(bad):
    with pytest.raises(TypeError):
        format_reward(bad, NAMES)


def test_candidate_names_as_one_string_is_type_error():
    # iterating "Mistral-7B" would yield single characters as names
    with pytest.raises(TypeError):
        format_reward(GOOD, "Qwen2.5-7B-Instruct")


def test_non_string_candidate_name_is_type_error():
    with pytest.raises(TypeError):
        format_reward(GOOD, ["Qwen2.5-7B-Instruct", None])


def test_candidate_names_may_be_an_iterator():
    # the names are read once per search; an iterator must not run dry after the first
    two_searches = trajectory(search("Mistral-7B: q"), search("Mistral-7B: r"))
    assert format_reward(two_searches, iter(NAMES)) == 0.0


def test_unicode_content_is_accepted():
    text = trajectory(search("Mistral-7B: 北京の人口は? 🎉"), "<think>café ✓</think>")
    assert format_reward(text, NAMES) == 0.0


def test_one_megabyte_response_finishes_fast():
    big = "<think>" + "x <info " * (1 << 17) + "</think>" + search("Mistral-7B: q") * 2000 + "<answer>x</answer>"
    start = time.perf_counter()
    assert format_reward(big, NAMES) == 0.0
    assert time.perf_counter() - start < 10.0  # linear takes well under 1 s; quadratic, hours


_FRAGMENTS = st.sampled_from([
    "<think>", "</think>", "<search>", "</search>", "<info>", "</info>", "<answer>", "</answer>",
    "Mistral-7B:", "qwen2.5-7b-instruct", ":", " q ", "\n", " ", "<", ">", "/", "think", "北", "🎉", "",
])


@given(st.text())
def test_never_raises_on_arbitrary_text_and_returns_zero_or_minus_one(text):
    assert format_reward(text, NAMES) in (0.0, -1.0)


@given(st.lists(_FRAGMENTS, max_size=30).map("".join))
def test_never_raises_on_tag_fragments_and_returns_zero_or_minus_one(text):
    # random tag fragments hit the grammar's corners (stray closes, nesting, half tags) often
    assert format_reward(text, NAMES) in (0.0, -1.0)


@given(st.lists(_FRAGMENTS, max_size=30).map("".join))
def test_reward_is_zero_exactly_when_no_errors(text):
    assert (format_reward(text, NAMES) == 0.0) == (format_errors(text, NAMES) == [])


_THOUGHT = st.text(alphabet=st.characters(blacklist_characters="<>"), min_size=1).filter(str.strip)
_QUERY = st.text(alphabet=st.characters(blacklist_characters="<>"), min_size=1).filter(str.strip)
_REPLY = st.text(alphabet=st.characters(blacklist_characters="<>"))


@st.composite
def well_formed(draw) -> str:
    parts = [f"<think>{draw(_THOUGHT)}</think>"]
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(NAMES))
        name = draw(st.sampled_from([name, name.lower(), name.upper()]))
        parts.append(f"<search> {name}: {draw(_QUERY)}</search>\n<info>{draw(_REPLY)}</info>")
        parts.append(f"<think>{draw(_THOUGHT)}</think>")
    parts.append(f"<answer>{draw(_REPLY)}</answer>")
    return "\n".join(parts)


@given(well_formed())
def test_every_generated_well_formed_trajectory_scores_zero(text):
    # the positive side of every clause at once, over queries with colons, unicode and spaces
    assert format_reward(text, NAMES) == 0.0
