"""Failed candidate calls: counted in every metrics table, warned about at the first one, and a run
stopped when (nearly) every call fails, since it would otherwise train on error replies.

Only backend failures after retries count (a call record with `error` set). The env's own refusals
(an unknown candidate, a malformed call, no turns left) are the policy's behaviour and make no call.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class CallFailureConfig:
    """Stop a run when at least `abort_rate` of at least `min_calls` candidate calls failed over its
    last `window_steps` steps (or warm-start rounds). The defaults catch "every call fails"."""

    abort_rate: float = 0.9  # share of failed calls that stops the run (1.0: only when all fail)
    min_calls: int = 20  # fewer calls than this in the window never stop the run
    window_steps: int = 2  # steps (or warm-start rounds) the shares are taken over

    def __post_init__(self) -> None:
        if not 0.0 < self.abort_rate <= 1.0:
            raise ValueError(f"calls.abort_rate={self.abort_rate!r} must lie in (0, 1]")
        if self.min_calls < 1 or self.window_steps < 1:
            raise ValueError(f"calls.min_calls={self.min_calls!r} and calls.window_steps={self.window_steps!r} "
                             "must be >= 1")


class CallFailureAbort(RuntimeError):
    """Too many candidate calls failed: the run is stopped rather than trained on error replies."""


def error_kind(error: str) -> str:
    """A short name for what went wrong, from a call record's error text: http_<status>, timeout,
    connection, api_key, bad_reply, replay or other."""
    status = re.search(r"\bHTTP (\d{3})\b", error)
    if status:
        return f"http_{status.group(1)}"
    for kind, pattern in (("timeout", r"Timeout|\(timeout\)"), ("connection", r"Connect|Connection|RemoteProtocol|ReadError"),
                          ("api_key", r"environment variable|API key"), ("bad_reply", r"not JSON|choices\[0\]"),
                          ("replay", r"^replay:")):
        if re.search(pattern, error):
            return kind
    return "other"


def call_failure_metrics(summaries: Iterable[Mapping], prefix: str) -> dict[str, float]:
    """Per episode: failed calls, and the same split by candidate and by error kind; and the share of
    calls that failed (`{prefix}/call_error_rate`)."""
    summaries = list(summaries)
    n = max(len(summaries), 1)
    calls = [c for s in summaries for c in s["calls"]]
    failed = [c for c in calls if c.get("error")]
    out = {f"{prefix}/failed_calls": len(failed) / n, f"{prefix}/call_error_rate": len(failed) / max(len(calls), 1)}
    for c in failed:
        for key in (f"{prefix}/call_errors_{c['candidate']}", f"{prefix}/call_errors_kind_{error_kind(c['error'])}"):
            out[key] = out.get(key, 0.0) + 1.0 / n
    return out


def first_error(summaries: Iterable[Mapping]) -> str | None:
    """The first failed call's error text, led by its candidate's name, or None."""
    for s in summaries:
        for c in s["calls"]:
            if c.get("error"):
                named = c["error"].startswith(f"{c['candidate']}: ")  # the openai backend names it already
                return c["error"] if named else f"{c['candidate']}: {c['error']}"
    return None


class CallFailureMonitor:
    """Watches each step's (calls, failed calls): warns once, quoting the first error, and raises
    `CallFailureAbort` when the window's share of failures reaches `cfg.abort_rate`."""

    def __init__(self, cfg: CallFailureConfig):
        self.cfg = cfg
        self.window: deque[tuple[float, float]] = deque(maxlen=cfg.window_steps)
        self.warned = False

    def observe(self, calls: float, failed: float, error: str | None, where: str = "steps") -> None:
        if failed and not self.warned:
            log.warning("candidate calls are failing (%d of %d); first error: %s", failed, calls, error)
            self.warned = True
        self.window.append((calls, failed))
        total, bad = sum(c for c, _ in self.window), sum(f for _, f in self.window)
        if total >= self.cfg.min_calls and bad >= self.cfg.abort_rate * total:
            raise CallFailureAbort(
                f"{bad:.0f} of {total:.0f} candidate calls failed over the last {len(self.window)} {where} "
                f"(calls.abort_rate={self.cfg.abort_rate}); first error: {error}. Check the candidate pool's "
                "backend: is the server up, is base_url right, is the API key variable set?")
