"""The tag grammar of a Router-R1 trajectory: tag names, stop strings, block splitting, call parsing,
an incremental scanner for streamed text, and escaping of inserted candidate replies."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

THINK, SEARCH, INFO, ANSWER = "think", "search", "info", "answer"
TAGS = (THINK, SEARCH, INFO, ANSWER)

# The rollout engine stops generating when one of these has just been written.
STOP_STRINGS = (f"</{SEARCH}>", f"</{ANSWER}>")

_TAG_RE = re.compile(r"<(/?)(think|search|info|answer)>")
_MAX_TAG_LEN = max(len(f"</{t}>") for t in TAGS)


def open_tag(name: str) -> str:
    return f"<{name}>"


def close_tag(name: str) -> str:
    return f"</{name}>"


@dataclass(frozen=True)
class Block:
    """One `<tag> content </tag>` block: `start` is the index of `<`, `end` the index after `>`."""

    tag: str
    content: str
    start: int
    end: int


class TagError(ValueError):
    """The text does not follow the tag grammar (nesting, unbalanced or stray tags)."""


def split_blocks(text: str) -> list[Block]:
    """Split `text` into its tag blocks, in order.

    Rule: tags are the exact lowercase strings `<think>`, `</think>`, ... for the four tag names.
    Blocks are never nested and every opening tag is closed before the next opening tag; a close
    without its open, an open inside another block, or an unclosed block raises `TagError`.
    Text outside blocks is allowed and ignored.
    """
    if not isinstance(text, str):
        raise TypeError(f"split_blocks expects str, got {type(text).__name__}")
    blocks: list[Block] = []
    open_name: str | None = None
    open_at = content_at = 0
    for m in _TAG_RE.finditer(text):
        is_close, name = m.group(1) == "/", m.group(2)
        if not is_close:
            if open_name is not None:
                raise TagError(f"<{name}> at {m.start()} opens inside <{open_name}> opened at {open_at}")
            open_name, open_at, content_at = name, m.start(), m.end()
        else:
            if open_name != name:
                where = f"inside <{open_name}>" if open_name else "with no open block"
                raise TagError(f"</{name}> at {m.start()} closes {where}")
            blocks.append(Block(name, text[content_at:m.start()], open_at, m.end()))
            open_name = None
    if open_name is not None:
        raise TagError(f"<{open_name}> opened at {open_at} is never closed")
    return blocks


@dataclass(frozen=True)
class Call:
    """A parsed `<search> Name: query </search>`: `name` is the candidate's canonical name."""

    name: str
    query: str


def parse_call(content: str, candidate_names: Sequence[str]) -> Call:
    """Parse the content of a `<search>` block as `Name: query`.

    Rule: split on the FIRST colon (the query may hold more colons); `Name`, stripped, must equal
    one of `candidate_names` case-insensitively and exactly (no substring matching); the stripped
    query must be non-empty. Raises `ValueError` with a message fit to show the policy otherwise.
    """
    if isinstance(candidate_names, str):
        raise TypeError("candidate_names must be a sequence of names, not one string")
    names = tuple(candidate_names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"candidate_names must all be str, got {names!r}")
    if ":" not in content:
        raise ValueError("no colon: write <search> Candidate-Name: question </search>")
    raw_name, query = content.split(":", 1)
    wanted = raw_name.strip().casefold()
    matches = [n for n in names if n.casefold() == wanted]
    if not matches:
        raise ValueError(f"unknown candidate {raw_name.strip()!r}; known: {', '.join(names)}")
    if not query.strip():
        raise ValueError(f"empty query for {matches[0]}")
    return Call(matches[0], query.strip())


def check_candidate_name(name: str) -> str:
    """A candidate name must be non-empty, free of colons (they make `Name: query` ambiguous),
    of surrounding whitespace and of `<`/`>` (they could form tags)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"candidate name must be a non-empty string, got {name!r}")
    if ":" in name:
        raise ValueError(f"candidate name {name!r} contains ':' which makes 'Name: query' ambiguous")
    if name != name.strip() or "<" in name or ">" in name:
        raise ValueError(f"candidate name {name!r} must not have surrounding spaces or '<'/'>'")
    return name


# `(?:/\s*)?` rather than `/?\s*`: two adjacent `\s*` backtrack against each other, which made a `<`
# followed by a long run of spaces quadratic.
_TAGLIKE_RE = re.compile(r"<(?=\s*(?:/\s*)?(?:think|search|info|answer)\b|\|)", re.IGNORECASE)


def escape_info(text: str) -> str:
    """Neutralize tag-like text copied from outside (a candidate's reply, a question) before it is
    written into any block: the env's `<info>`, or a scripted router's thought, call or answer.

    Rule: every `<` that starts something tag-like for one of the four tag names (any case,
    optional `/` and spaces), or a special-token-like `<|`, becomes `&lt;`. The escaped text can
    then never close its block, open a search or an answer, or end the episode (as an EOS string
    would), whatever its length or truncation.
    """
    if not isinstance(text, str):
        raise TypeError(f"escape_info expects str, got {type(text).__name__}")
    return _TAGLIKE_RE.sub("&lt;", text)


def info_block(reply: str) -> str:
    """A candidate's reply exactly as the env inserts it after a `</search>`: escaped, inside
    `<info>`, on its own line."""
    return f"\n{open_tag(INFO)} {escape_info(reply).strip()} {close_tag(INFO)}\n"


@dataclass(frozen=True)
class TagEvent:
    """`kind` is "open" or "close"; for a closed search, `content` is the block's text."""

    kind: str
    tag: str
    content: str = ""


class TagScanner:
    """Incremental tag detection over streamed text, O(len(piece)) per `feed`.

    Feed it the text of each new policy token (from the tokenizer's incremental decoding, so that
    byte-level tokens holding half a character arrive whole). It keeps only the last few characters
    (a tag can straddle pieces) and, while a `<search>` is open, that block's text.
    """

    def __init__(self) -> None:
        self._tail = ""  # last _MAX_TAG_LEN - 1 characters already scanned
        self._search: list[str] | None = None  # pieces of the open search block's text

    def reset(self) -> None:
        self._tail, self._search = "", None

    def feed(self, piece: str) -> list[TagEvent]:
        """Return the tags completed by `piece`, in order."""
        if not piece:
            return []
        window = self._tail + piece
        events: list[TagEvent] = []
        # index in window from which the open search's text is not yet recorded; other tags inside
        # a search do not move it, so its content is the raw text between its tags however split
        search_from = len(self._tail)
        for m in _TAG_RE.finditer(window):
            if m.end() <= len(self._tail):
                continue  # entirely inside already-scanned text
            is_close, name = m.group(1) == "/", m.group(2)
            if name == SEARCH and is_close and self._search is not None:
                self._search.append(window[search_from:m.start()])
                content = "".join(self._search)
                # a closing tag that straddles two pieces left its head in the previous piece's text
                straddle = max(0, len(self._tail) - m.start())
                events.append(TagEvent("close", SEARCH, content[:len(content) - straddle]))
                self._search = None
                continue
            if name == SEARCH and not is_close:
                self._search, search_from = [], m.end()
            events.append(TagEvent("close" if is_close else "open", name))
        if self._search is not None:
            self._search.append(window[search_from:])
        self._tail = window[-(_MAX_TAG_LEN - 1):]
        return events

