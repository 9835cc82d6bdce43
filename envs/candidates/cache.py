"""The SQLite response cache that can sit in front of any candidate backend (off, readwrite, replay)."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

from envs.candidates.spec import Backend, CandidateError, Completion, Request

log = logging.getLogger(__name__)

MODES = ("off", "readwrite", "replay")

_SCHEMA = """CREATE TABLE IF NOT EXISTS completions (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    query TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    created REAL NOT NULL
)"""


class CacheMiss(CandidateError):
    """Replay mode found no stored reply for a request."""

    attempts = 0


def cache_key(request: Request) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the model id, the messages and the
    sampling parameters: exactly what decides a candidate's reply. The candidate's display name,
    price and the episode's question are not part of it."""
    payload = {"model": request.spec.model, "messages": request.messages, "sampling": request.sampling}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class CachedBackend:
    """Wraps `backend` with a one-file SQLite cache (WAL mode, so several processes may share it).

    Modes: `off` passes every call through and never touches the file; `readwrite` answers hits
    from the file (`cached=True`, `attempts=0`) and stores successful replies of misses; `replay`
    never calls `backend` and fails a miss with `CacheMiss` naming the model and the query.
    Stored per reply: text, prompt_tokens, completion_tokens (NULL when the backend could not tell,
    so the pool counts them again with the same tokenizer and the cost replays exactly).
    Calls come from one event-loop thread; a lock still guards the connection so the object is
    safe to share with other threads.
    """

    def __init__(self, backend: Backend, path: str | Path, mode: str = "readwrite"):
        if mode not in MODES:
            raise ValueError(f"unknown cache mode {mode!r}; known: {', '.join(MODES)}")
        self.backend = backend
        self.path = Path(path)
        self.mode = mode
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if mode == "replay" and not self.path.is_file():
            raise FileNotFoundError(f"replay cache {self.path} does not exist; record it first with "
                                    f"cache mode 'readwrite'")
        if mode != "off":
            self._connect()  # a bad path fails here, before any call

    def __repr__(self) -> str:
        return f"CachedBackend({self.backend!r}, path={str(self.path)!r}, mode={self.mode!r})"

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            if self.mode == "readwrite":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            if self.mode == "readwrite":
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(_SCHEMA)
            self._db = db
        return self._db

    def lookup(self, request: Request) -> Completion | None:
        """The stored reply for `request`, or None."""
        with self._lock:
            try:
                row = self._connect().execute(
                    "SELECT text, prompt_tokens, completion_tokens FROM completions WHERE key = ?",
                    (cache_key(request),)).fetchone()
            except sqlite3.OperationalError as e:
                raise RuntimeError(f"response cache {self.path}: {e}") from None
        if row is None:
            return None
        return Completion(row[0], row[1], row[2], cached=True, attempts=0)

    def store(self, request: Request, done: Completion) -> None:
        """Save a reply. A write that fails (disk full, file locked too long) is logged, not raised:
        the reply was paid for and the episode still gets it."""
        with self._lock:
            try:
                self._connect().execute(
                    "INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (cache_key(request), request.spec.model, request.query, done.text,
                     done.prompt_tokens, done.completion_tokens, time.time()))
            except sqlite3.Error as e:
                log.warning("response cache %s: could not store the reply of %s: %s", self.path,
                            request.spec.name, e)

    def __len__(self) -> int:
        with self._lock:
            return self._connect().execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    async def complete(self, request: Request) -> Completion:
        if self.mode == "off":
            return await self.backend.complete(request)
        hit = self.lookup(request)
        if hit is not None:
            return hit
        if self.mode == "replay":
            raise CacheMiss(f"replay cache {self.path.name}: no reply stored for model "
                            f"{request.spec.model!r} ({request.spec.name}), query {request.query[:80]!r}")
        done = await self.backend.complete(request)  # failures raise and are never stored
        self.store(request, done)
        return done

    async def aclose(self) -> None:
        """Close the inner backend and the file (it reopens on the next call)."""
        aclose = getattr(self.backend, "aclose", None)
        if aclose is not None:
            await aclose()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
