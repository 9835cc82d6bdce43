"""The candidate pool: routes calls to backends concurrently, counts tokens and keeps the cost ledger.

A backend is any object with `async complete(request) -> Completion` (and optionally `aclose()`);
backends register a factory by kind so a pool YAML can name them. A failed call never raises out of
the pool: it becomes a `CallRecord` with `error` set and zero cost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from envs.candidates.cache import CachedBackend
from envs.candidates.spec import (Backend, CallRecord, CandidateError, CandidateSpec, Request, RequestConfig,
                                  cut_reply)
from rewards.cost import affordable_tokens, raw_cost

log = logging.getLogger(__name__)


_BACKENDS: dict[str, Callable[..., Backend]] = {}


def register_backend(kind: str):
    """Register `factory(specs=..., **options) -> Backend` under `kind` (used by pool YAML files)."""
    def deco(factory):
        if kind in _BACKENDS:
            raise ValueError(f"backend {kind!r} is already registered")
        _BACKENDS[kind] = factory
        return factory
    return deco


def make_backend(kind: str, specs: Sequence[CandidateSpec], **options: Any) -> Backend:
    if kind not in _BACKENDS:
        _import_builtin_backends(kind)
    if kind not in _BACKENDS:
        raise ValueError(f"unknown candidate backend {kind!r}; known: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[kind](specs=specs, **options)


def _import_builtin_backends(kind: str) -> None:
    """Import the built-in module named like `kind` (they register on import), else all of them."""
    import importlib
    builtin = ("simulated", "openai", "local", "replay")
    for module in ([kind] if kind in builtin else builtin):
        try:
            importlib.import_module(f"envs.candidates.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"envs.candidates.{module}":
                raise


MAX_REPLY_CHARS = 16_384  # a longer reply is cut here, before anything tokenizes or stores it


def sanitize_reply(text: str, max_chars: int = MAX_REPLY_CHARS) -> str:
    """A candidate's reply as the run may use it: invalid Unicode (lone surrogates) replaced by
    U+FFFD, and at most `max_chars` characters ("[cut]" marks a cut). Applied once, where replies
    enter the pool, so the env, the ledger, the cache and the samples see the same text."""
    text = re.sub(r"[\ud800-\udfff]", "\ufffd", text)
    return text if len(text) <= max_chars else text[:max_chars] + " [cut]"


def word_count(text: str) -> int:
    """Fallback token counter when no tokenizer is given: whitespace-separated words."""
    return len(text.split())


class _LoopThread:
    """A private asyncio loop on a daemon thread, so async clients live across batches of calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="candidate-calls")
        self.thread.start()

    def run(self, coro, timeout_s: float | None = None):
        """Run `coro` on the loop and wait at most `timeout_s` (TimeoutError past it)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the loop; its thread is a daemon, so one stuck past `timeout_s` never holds the process."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=timeout_s)
        if not self.thread.is_alive():
            self.loop.close()


def _settle(future: concurrent.futures.Future, task: asyncio.Task) -> None:
    """Give a finished task's result (or exception, or cancellation) to the future waiting on it."""
    if task.cancelled():
        future.set_exception(concurrent.futures.CancelledError())
    elif task.exception() is not None:
        future.set_exception(task.exception())
    else:
        future.set_result(task.result())


class CandidatePool:
    """Candidates by name, one backend serving them, the request config and the pricing rule."""

    def __init__(
        self,
        specs: Sequence[CandidateSpec],
        backend: Backend,
        request: RequestConfig | None = None,
        count_prompt_tokens: bool = False,
        count_tokens: Callable[[str], int] = word_count,
    ):
        if not specs:
            raise ValueError("a candidate pool needs at least one candidate")
        self.specs = list(specs)
        seen: dict[str, str] = {}
        for s in self.specs:
            key = s.name.casefold()
            if key in seen:
                raise ValueError(f"candidate names {seen[key]!r} and {s.name!r} collide (names are case-insensitive)")
            seen[key] = s.name
        self.by_name = {s.name: s for s in self.specs}
        self.backend = backend
        self.request = request or RequestConfig()
        self.count_prompt_tokens = count_prompt_tokens
        self.count_tokens = count_tokens
        self._loop: _LoopThread | None = None
        self._listeners: list[Callable[[CallRecord], None]] = []

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def call(self, name: str, query: str, question: str = "", max_tokens: int | None = None) -> CallRecord:
        return self.call_many([(name, query, question, max_tokens)])[0]

    def call_many(self, calls: Sequence[tuple]) -> list[CallRecord]:
        """Run (candidate name, query, episode question[, max_tokens]) calls concurrently; records in
        input order."""
        return [f.result() for f in self.submit(calls)]

    def affordable(self, name: str, query: str, spent: float, cap: float) -> int:
        """The reply tokens (at most the request's `max_tokens`) that a call of `name` with `query` may
        take so that `spent` plus its cost stays within `cap`: its priced prompt tokens, counted by
        this pool's counter as it counts them when a backend does not, are paid first."""
        spec = self.by_name[name]
        prompt_tokens = sum(self.count_tokens(m["content"]) for m in self.request.messages(query))
        price_in = spec.price_per_1m_input if self.count_prompt_tokens else 0.0
        return affordable_tokens(spent, cap, prompt_tokens, price_in, spec.price_per_1m_output,
                                 self.request.max_tokens)

    def submit(self, calls: Sequence[tuple]) -> list[concurrent.futures.Future]:
        """Start (candidate name, query, episode question[, max_tokens]) calls in the background,
        concurrently, and return at once: each future's result is its call's record (a failure is a
        record too). A call's `max_tokens` (a spending cap's) replaces the request's; a reply
        reported longer than it is cut (`cut_reply`), so every backend is held to it."""
        if not calls:
            return []
        if self._loop is None:
            self._loop = _LoopThread()
        futures = [concurrent.futures.Future() for _ in calls]
        self._loop.loop.call_soon_threadsafe(self._start, list(calls), futures)  # one wake-up for the batch
        return futures

    def on_record(self, listener: Callable[[CallRecord], None]) -> None:
        """Give `listener` the record of every call made from now on, failed ones included (an audit
        of the ledger: `tests/test_chaos.py` and `bench/chaos.py` count a server's requests against it)."""
        self._listeners.append(listener)

    def _start(self, calls: list[tuple], futures: list[concurrent.futures.Future]) -> None:
        """On the loop's thread: a task per call, whose outcome settles its future."""
        for call, future in zip(calls, futures):
            if future.set_running_or_notify_cancel():
                task = self._loop.loop.create_task(self._call(*call))
                task.add_done_callback(lambda t, f=future: _settle(f, t))

    async def _call(self, name: str, query: str, question: str, max_tokens: int | None = None) -> CallRecord:
        record = await self._make_call(name, query, question, max_tokens)
        for listener in self._listeners:
            listener(record)
        return record

    async def _make_call(self, name: str, query: str, question: str, max_tokens: int | None = None) -> CallRecord:
        spec = self.by_name[name]
        messages = self.request.messages(query)
        sampling = self.request.sampling() if max_tokens is None else {**self.request.sampling(), "max_tokens": max_tokens}
        request = Request(spec, query, messages, sampling, question)
        start = time.perf_counter()
        try:
            done = await self.backend.complete(request)
        except Exception as e:  # a candidate failure degrades the episode, never the run
            reason = str(e) if isinstance(e, CandidateError) else f"{type(e).__name__}: {e}"
            return CallRecord(name, query, "", latency_s=time.perf_counter() - start,
                              error=reason[:300], attempts=getattr(e, "attempts", 0))
        text = sanitize_reply(done.text)
        prompt_tokens = done.prompt_tokens
        if prompt_tokens is None:
            prompt_tokens = sum(self.count_tokens(m["content"]) for m in messages)
        completion_tokens = done.completion_tokens
        if completion_tokens is None:
            completion_tokens = self.count_tokens(text)
        cut = max_tokens is not None and completion_tokens > max_tokens
        if cut:  # a backend that does not stop at max_tokens itself (simulated, replay)
            text, completion_tokens = cut_reply(text, completion_tokens, max_tokens)
        record = CallRecord(
            name, query, text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            price_per_1m_input=spec.price_per_1m_input if self.count_prompt_tokens else 0.0,
            price_per_1m_output=spec.price_per_1m_output, latency_s=time.perf_counter() - start,
            cached=done.cached, attempts=done.attempts, extra={"cut": True} if cut else {},
        )
        record.cost = raw_cost([record])
        record.full_cost = raw_cost([{**record.as_dict(), "price_per_1m_input": spec.price_per_1m_input}])
        return record

    def close(self, timeout_s: float = 5.0) -> None:
        """Close the backend's clients and stop the call loop, waiting at most `timeout_s` for each.
        Never blocks longer; idempotent."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        aclose = getattr(self.backend, "aclose", None)
        if aclose is not None:
            try:
                loop.run(aclose(), timeout_s)
            except concurrent.futures.TimeoutError:
                log.warning("candidate pool: closing the backend took over %.0fs; left to the exit", timeout_s)
            except Exception as e:  # closing must not turn a finished run into a crash
                log.warning("candidate pool: closing the backend failed: %s: %s", type(e).__name__, e)
        loop.stop(timeout_s)

    def __del__(self):
        # during interpreter shutdown no other thread may run any more: waiting on the loop's thread
        # would hang the exit for good, so nothing is awaited (the loop's thread is a daemon)
        if sys.is_finalizing() or self._loop is None:
            return
        try:
            self.close(timeout_s=1.0)
        except Exception:
            pass


_POOL_KEYS = {"candidates", "backend", "request", "count_prompt_tokens", "cache"}
_SPEC_KEYS = {"name", "model", "params_b", "price_per_1m_output", "price_per_1m_input", "description"}


def load_pool(
    source: str | Path | Mapping,
    count_tokens: Callable[[str], int] = word_count,
    backend: Backend | None = None,
) -> CandidatePool:
    """Build a pool from a YAML file (or its parsed mapping). `backend` overrides the file's backend
    (e.g. a simulated one built in code). Unknown keys are errors naming the file and the key."""
    where = str(source) if not isinstance(source, Mapping) else "<pool mapping>"
    if isinstance(source, Mapping):
        cfg = dict(source)
    else:
        with open(source) as f:
            cfg = yaml.safe_load(f) or {}
    unknown = set(cfg) - _POOL_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_POOL_KEYS)}")
    specs = []
    for i, c in enumerate(cfg.get("candidates") or []):
        if not isinstance(c, Mapping):
            raise ValueError(f"{where}: candidates[{i}] is {c!r}; each candidate is a mapping of {sorted(_SPEC_KEYS)}")
        bad = set(c) - _SPEC_KEYS
        if bad:
            raise ValueError(f"{where}: candidates[{i}] has unknown key(s) {sorted(bad)}; allowed: {sorted(_SPEC_KEYS)}")
        try:
            specs.append(CandidateSpec(**c))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: candidates[{i}]: {e}") from None
    if not specs:
        raise ValueError(f"{where}: no candidates listed under 'candidates'")
    if backend is None:
        options = dict(cfg.get("backend") or {"kind": "simulated"})
        if "kind" not in options:
            raise ValueError(f"{where}: 'backend' needs a 'kind' (simulated, openai, local or replay)")
        kind = options.pop("kind")
        try:
            backend = make_backend(kind, specs, **options)
        except TypeError as e:  # a misspelled or missing option of the backend
            raise ValueError(f"{where}: backend {kind!r}: {e}") from None
    cache = cfg.get("cache") or {}
    if set(cache) - {"mode", "path"}:
        raise ValueError(f"{where}: unknown key(s) under 'cache': {sorted(set(cache) - {'mode', 'path'})}; allowed: mode, path")
    if cache.get("mode", "off") != "off":
        if not cache.get("path"):
            raise ValueError(f"{where}: cache.mode={cache['mode']!r} needs cache.path (an SQLite file)")
        try:
            backend = CachedBackend(backend, path=cache["path"], mode=cache["mode"])
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{where}: cache.path {cache['path']!r} is not a readable SQLite cache ({e})") from None
    return CandidatePool(specs, backend, RequestConfig(**(cfg.get("request") or {})),
                         bool(cfg.get("count_prompt_tokens", False)), count_tokens)
