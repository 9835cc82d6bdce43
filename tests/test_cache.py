"""The SQLite response cache: record against a loopback server, replay without it, and the modes."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from envs.candidates.fault_server import closed_port_url, serve_openai

from envs.candidates.cache import CachedBackend, CacheMiss, cache_key
from envs.candidates.pool import load_pool
from envs.candidates.simulated import SimulatedBackend
from envs.candidates.spec import CandidateSpec, Request, RequestConfig

SPECS = [
    {"name": "Small", "model": "org/small-7b", "params_b": 7, "price_per_1m_output": 0.2},
    {"name": "Large", "model": "org/large-70b", "params_b": 70, "price_per_1m_output": 0.9},
]
CALLS = [("Small", "who wrote Hamlet", ""), ("Large", "capital of France", ""), ("Small", "2 + 2", "")]


def pool_config(base_url: str, path, mode: str, **extra) -> dict:
    backend = {"kind": "openai", "base_url": base_url, "max_retries": 0, "timeout_s": 2.0}
    return {"candidates": SPECS, "backend": backend, "cache": {"mode": mode, "path": str(path)}, **extra}


def run_calls(cfg: dict, calls=CALLS):
    pool = load_pool(cfg)
    try:
        return pool.call_many(calls)
    finally:
        pool.close()


def fields(records):
    return [(r.candidate, r.reply, r.prompt_tokens, r.completion_tokens, r.cost) for r in records]


def test_replay_reproduces_recorded_texts_tokens_and_costs_without_the_server(tmp_path):
    path = tmp_path / "cache" / "candidates.sqlite"
    with serve_openai() as server:
        recorded = run_calls(pool_config(server.base_url, path, "readwrite"))
        url = server.base_url
    assert all(r.error is None and not r.cached for r in recorded)
    replayed = run_calls(pool_config(url, path, "replay"))  # the server is gone now
    assert fields(replayed) == fields(recorded)
    assert all(r.cached and r.error is None for r in replayed)


def test_readwrite_hit_does_not_call_the_backend_again(tmp_path):
    with serve_openai() as server:
        cfg = pool_config(server.base_url, tmp_path / "c.sqlite", "readwrite")
        first = run_calls(cfg)
        second = run_calls(cfg)
        assert server.requests == len(CALLS)
    assert fields(second) == fields(first)
    assert all(r.cached and r.attempts == 0 for r in second)


def test_usage_less_reply_replays_with_the_same_pool_count(tmp_path):
    path = tmp_path / "c.sqlite"
    with serve_openai() as server:
        server.script("no_usage")
        recorded = run_calls(pool_config(server.base_url, path, "readwrite"), CALLS[:1])
    replayed = run_calls(pool_config(closed_port_url(), path, "replay"), CALLS[:1])
    assert fields(replayed) == fields(recorded)


def test_replay_miss_is_an_error_record_naming_candidate_model_and_query(tmp_path):
    path = tmp_path / "c.sqlite"
    with serve_openai() as server:
        run_calls(pool_config(server.base_url, path, "readwrite"), CALLS[:1])
    query = "a question that was never recorded " * 5
    [record] = run_calls(pool_config(closed_port_url(), path, "replay"), [("Large", query, "")])
    assert record.cost == 0 and record.reply == ""
    assert "Large" in record.error and "org/large-70b" in record.error and query[:80] in record.error


def test_failed_calls_are_not_stored(tmp_path):
    path = tmp_path / "c.sqlite"
    with serve_openai() as server:
        server.script("500")
        [failed] = run_calls(pool_config(server.base_url, path, "readwrite"), CALLS[:1])
    assert failed.error is not None
    assert len(CachedBackend(SimulatedBackend({}), path, "replay")) == 0


def test_off_mode_never_creates_the_file(tmp_path):
    path = tmp_path / "never.sqlite"
    with serve_openai() as server:
        records = run_calls(pool_config(server.base_url, path, "off"))
        direct = CachedBackend(SimulatedBackend({"Small": lambda r: "hi"}), path, "off")
        spec = CandidateSpec(**SPECS[0])
        done = asyncio.run(direct.complete(Request(spec, "q", RequestConfig().messages("q"), {})))
    assert all(r.error is None for r in records) and done.text == "hi"
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_unknown_mode_lists_the_modes(tmp_path):
    with pytest.raises(ValueError, match="off, readwrite, replay"):
        CachedBackend(SimulatedBackend({}), tmp_path / "c.sqlite", "write-only")


def test_replay_of_a_missing_file_fails_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="readwrite"):
        CachedBackend(SimulatedBackend({}), tmp_path / "absent.sqlite", "replay")


def test_replay_miss_raises_cache_miss_directly(tmp_path):
    path = tmp_path / "c.sqlite"
    CachedBackend(SimulatedBackend({}), path, "readwrite")  # creates an empty cache
    spec = CandidateSpec(**SPECS[0])
    backend = CachedBackend(SimulatedBackend({}), path, "replay")
    with pytest.raises(CacheMiss, match="org/small-7b"):
        asyncio.run(backend.complete(Request(spec, "q", RequestConfig().messages("q"), {})))


def test_key_depends_on_model_messages_and_sampling_only():
    spec = CandidateSpec(**SPECS[0])
    renamed = CandidateSpec(**{**SPECS[0], "name": "Other", "price_per_1m_output": 5.0})
    messages = RequestConfig().messages("q")
    base = Request(spec, "q", messages, {"temperature": 0.0, "max_tokens": 8}, question="A")
    assert cache_key(base) == cache_key(Request(renamed, "q", messages, {"max_tokens": 8, "temperature": 0.0}, "B"))
    assert cache_key(base) != cache_key(Request(spec, "q", messages, {"temperature": 0.0, "max_tokens": 9}))
    assert cache_key(base) != cache_key(Request(spec, "q", RequestConfig().messages("r"), base.sampling))
    other_model = CandidateSpec(**{**SPECS[0], "model": "org/other"})
    assert cache_key(base) != cache_key(Request(other_model, "q", messages, base.sampling))


def test_cache_file_is_in_wal_mode(tmp_path):
    path = tmp_path / "c.sqlite"
    CachedBackend(SimulatedBackend({}), path, "readwrite")
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
