"""Failed candidate calls: counted in every metrics table, warned about at the first one, and a run
stopped when (nearly) every call fails, since it would otherwise train on error replies.

Only backend failures after retries count (a call record with `error` set). The env's own refusals
(an unknown candidate, a malformed call, no turns left) are the policy's behaviour and make no call.
"""

from __future__ import annotations

import logging
import re
import threading
import time
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
                return named_error(c["candidate"], c["error"])
    return None


def named_error(candidate: str, error: str) -> str:
    """A call's error text led by its candidate's name (once: the openai backend names it already)."""
    return error if error.startswith(f"{candidate}: ") else f"{candidate}: {error}"


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


class RecentCallFailures:
    """A server's view of the same rule: the calls of the last `window_s` seconds, failing when at
    least `cfg.abort_rate` of at least `cfg.min_calls` failed (a server reports it and never stops).
    `observe` takes every call record (`CandidatePool.on_record`) from any thread."""

    def __init__(self, cfg: CallFailureConfig, window_s: float = 60.0, clock=time.monotonic):
        self.cfg, self.window_s, self.clock = cfg, window_s, clock
        self._recent: deque[tuple[float, bool]] = deque()
        self._lock = threading.Lock()
        self.calls = self.failed = 0
        self.by_kind: dict[str, int] = {}
        self.last_error: str | None = None

    def observe(self, record) -> None:
        with self._lock:
            self._recent.append((self.clock(), bool(record.error)))
            self.calls += 1
            if record.error:
                self.failed += 1
                kind = error_kind(record.error)
                self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
                self.last_error = named_error(record.candidate, record.error)

    def snapshot(self) -> dict:
        """Counts of the window and since the start, and whether the window is failing."""
        with self._lock:
            while self._recent and self._recent[0][0] < self.clock() - self.window_s:
                self._recent.popleft()
            calls, failed = len(self._recent), sum(f for _, f in self._recent)
            return {"failing": calls >= self.cfg.min_calls and failed >= self.cfg.abort_rate * calls,
                    "window_s": self.window_s, "recent_calls": calls, "recent_failed": failed,
                    "recent_failed_call_rate": failed / max(calls, 1), "abort_rate": self.cfg.abort_rate,
                    "min_calls": self.cfg.min_calls, "calls": self.calls, "failed_calls": self.failed,
                    "failed_by_kind": dict(self.by_kind), "last_error": self.last_error}
