"""The openai backend against a real loopback HTTP server: replies, retries, limits and secrecy."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest
from envs.candidates.fault_server import closed_port_url, reply_text, serve_openai

from envs.candidates.cache import CachedBackend
from envs.candidates.openai import OpenAIBackend, parse_retry_after
from envs.candidates.pool import load_pool
from envs.candidates.spec import CandidateError, CandidateSpec, Request, RequestConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "candidates"
KEY_ENV = "ROUTER_TEST_API_KEY"
KEY = "sk-test-7f3a9c0e-do-not-leak"
SPECS = [
    {"name": "Alpha", "model": "org/alpha-7b", "params_b": 7, "price_per_1m_output": 0.3},
    {"name": "Beta", "model": "org/beta-70b", "params_b": 70, "price_per_1m_output": 0.9},
]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def server():
    with serve_openai(api_key=KEY) as srv:
        yield srv


def make_pool(base_url: str, count_tokens=None, **backend):
    options = {"kind": "openai", "base_url": base_url, "api_key_env": KEY_ENV, "timeout_s": 2.0,
               "max_retries": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.02, "seed": 0, **backend}
    cfg = {"candidates": SPECS, "backend": options}
    return load_pool(cfg, count_tokens=count_tokens) if count_tokens else load_pool(cfg)


def call_one(pool, query="what is two plus two", name="Alpha"):
    try:
        return pool.call(name, query)
    finally:
        pool.close()


def direct_request(query: str = "hello there") -> Request:
    spec = CandidateSpec(**SPECS[0])
    config = RequestConfig()
    return Request(spec, query, config.messages(query), config.sampling())


def test_reply_text_and_usage_come_from_the_server(server):
    record = call_one(make_pool(server.base_url))
    messages = RequestConfig().messages("what is two plus two")
    assert record.error is None
    assert record.reply == reply_text("org/alpha-7b", messages)
    assert record.prompt_tokens == sum(len(m["content"].split()) for m in messages)
    assert record.completion_tokens == len(record.reply.split())
    assert record.cost == pytest.approx(record.completion_tokens * 0.3)
    assert record.attempts == 1


def test_request_body_carries_model_messages_and_sampling(server):
    call_one(make_pool(server.base_url), name="Beta", query="q")
    config = RequestConfig()
    assert server.bodies == [{"model": "org/beta-70b", "messages": config.messages("q"), **config.sampling()}]


def test_bearer_key_is_read_from_the_named_env_var(server):
    call_one(make_pool(server.base_url))
    assert server.authorizations == [f"Bearer {KEY}"]


@pytest.mark.parametrize("fault", ["500", "429", "timeout", "malformed", "no_content"])
def test_transient_fault_is_retried_once_then_succeeds(fault):
    with serve_openai(api_key=KEY, retry_after="0", hang_s=2.0) as server:
        server.script(fault)
        record = call_one(make_pool(server.base_url, timeout_s=0.5))
        assert record.error is None and record.reply.startswith("[org/alpha-7b]")
        assert record.attempts == 2
        assert server.requests == 2


@pytest.mark.parametrize("fault", ["500", "malformed"])
def test_persistent_fault_gives_up_after_max_retries_with_zero_cost(server, fault):
    server.script(*[fault] * 10)
    record = call_one(make_pool(server.base_url, max_retries=2))
    assert server.requests == 3
    assert record.attempts == 3 and "after 3 attempt(s)" in record.error
    assert record.cost == 0 and record.full_cost == 0 and record.reply == ""
    assert record.prompt_tokens == 0 and record.completion_tokens == 0


def test_client_error_is_not_retried(server):
    server.script("400")
    record = call_one(make_pool(server.base_url, max_retries=3))
    assert server.requests == 1
    assert record.attempts == 1 and "HTTP 400" in record.error


def test_retry_after_is_honoured_instead_of_backoff():
    with serve_openai(api_key=KEY, retry_after="1") as server:
        server.script("429")
        start = time.perf_counter()
        record = call_one(make_pool(server.base_url, backoff_base_s=0.01))
        elapsed = time.perf_counter() - start
    assert record.error is None and record.attempts == 2
    assert 0.95 <= elapsed < 3.0


def test_retry_after_is_capped():
    with serve_openai(api_key=KEY, retry_after="30") as server:
        server.script("429")
        start = time.perf_counter()
        record = call_one(make_pool(server.base_url, retry_after_max_s=0.05))
    assert record.error is None and time.perf_counter() - start < 2.0


def test_backoff_without_retry_after_is_short():
    with serve_openai(api_key=KEY) as server:
        server.script("500", "500")
        start = time.perf_counter()
        record = call_one(make_pool(server.base_url, backoff_base_s=0.01, backoff_max_s=0.02))
    assert record.error is None and record.attempts == 3
    assert time.perf_counter() - start < 0.9


def test_connection_refused_becomes_an_error_record():
    record = call_one(make_pool(closed_port_url(), max_retries=1))
    assert record.attempts == 2 and "ConnectError" in record.error
    assert record.cost == 0


def test_no_exception_escapes_call_many_and_order_is_kept(server):
    server.script("400", None, "500", None)
    pool = make_pool(server.base_url, max_retries=0, max_concurrency=1)
    try:
        records = pool.call_many([("Alpha", f"q{i}", "") for i in range(4)])
    finally:
        pool.close()
    assert [r.query for r in records] == ["q0", "q1", "q2", "q3"]
    assert [r.error is None for r in records] == [False, True, False, True]
    assert all(r.cost == 0 for r in records if r.error)


def test_usage_less_reply_is_counted_with_the_pool_counter(server):
    server.script("no_usage")
    record = call_one(make_pool(server.base_url, count_tokens=len))  # characters as "tokens"
    messages = RequestConfig().messages("what is two plus two")
    assert record.error is None
    assert record.completion_tokens == len(record.reply)
    assert record.prompt_tokens == sum(len(m["content"]) for m in messages)


def test_concurrency_is_limited_to_max_concurrency():
    with serve_openai(api_key=KEY, delay_s=0.1) as server:
        pool = make_pool(server.base_url, max_concurrency=2)
        try:
            records = pool.call_many([("Alpha", f"q{i}", "") for i in range(6)])
        finally:
            pool.close()
        assert all(r.error is None for r in records)
        assert server.max_in_flight == 2


def test_api_key_never_appears_in_errors_reprs_or_logs(caplog):
    caplog.set_level(logging.DEBUG)
    with serve_openai(api_key="the-server-wants-another-key") as server:  # 401 echoes our header
        pool = make_pool(server.base_url)
        try:
            record = pool.call("Alpha", "q")
            with pytest.raises(CandidateError) as info:
                asyncio.run(OpenAIBackend(server.base_url, api_key_env=KEY_ENV).complete(direct_request()))
            texts = [record.error, json.dumps(record.as_dict()), repr(pool.backend), str(pool.backend),
                     str(info.value), repr(info.value), caplog.text]
        finally:
            pool.close()
    assert "HTTP 401" in record.error and "***" in record.error
    assert all(KEY not in text for text in texts)


def test_missing_key_env_var_fails_calls_naming_the_variable(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    record = call_one(make_pool(server.base_url))
    assert KEY_ENV in record.error and record.attempts == 0
    assert server.requests == 0


def test_direct_failure_raises_candidate_error_with_attempts():
    backend = OpenAIBackend(closed_port_url(), max_retries=2, backoff_base_s=0.0)
    with pytest.raises(CandidateError) as info:
        asyncio.run(backend.complete(direct_request()))
    assert info.value.attempts == 3


def test_backend_survives_a_change_of_event_loop(server):
    backend = OpenAIBackend(server.base_url, api_key_env=KEY_ENV)
    first = asyncio.run(backend.complete(direct_request("one")))
    second = asyncio.run(backend.complete(direct_request("two")))
    assert (first.text, second.text) == (reply_text("org/alpha-7b", direct_request("one").messages),
                                         reply_text("org/alpha-7b", direct_request("two").messages))


def test_full_jitter_backoff_stays_within_its_cap_and_is_seeded():
    a = OpenAIBackend("http://x", backoff_base_s=0.5, backoff_max_s=3.0, seed=7)
    b = OpenAIBackend("http://x", backoff_base_s=0.5, backoff_max_s=3.0, seed=7)
    waits = [a.backoff_s(k, None) for k in range(1, 8) for _ in range(50)]
    assert waits == [b.backoff_s(k, None) for k in range(1, 8) for _ in range(50)]
    assert all(0.0 <= w <= min(3.0, 0.5 * 2 ** (k - 1))
               for w, k in zip(waits, [k for k in range(1, 8) for _ in range(50)]))


def test_retry_after_parses_seconds_and_http_dates():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_router_r1_pool_config_loads_with_the_papers_prices(monkeypatch, tmp_path):
    monkeypatch.setenv("ROUTER_API_KEY", "unused")
    monkeypatch.chdir(tmp_path)  # the readwrite cache is created relative to the working directory
    pool = load_pool(CONFIG_DIR / "router_r1.yaml")
    try:
        prices = {s.name: (s.price_per_1m_input, s.price_per_1m_output) for s in pool.specs}
        assert prices == {"Qwen2.5-7B-Instruct": (0.30, 0.30), "LLaMA-3.1-8B-Instruct": (0.18, 0.18),
                          "LLaMA-3.1-70B-Instruct": (0.88, 0.88), "Mistral-7B-Instruct": (0.20, 0.20),
                          "Mixtral-8x22B-Instruct": (1.20, 1.20), "Gemma-2-27B-Instruct": (0.80, 0.80)}
        assert all(s.description for s in pool.specs) and not pool.count_prompt_tokens
        assert isinstance(pool.backend, CachedBackend) and pool.backend.mode == "readwrite"
        assert isinstance(pool.backend.backend, OpenAIBackend)
        assert pool.backend.backend.api_key_env == "ROUTER_API_KEY"
        assert (pool.request.temperature, pool.request.max_tokens) == (0.0, 512)
        assert (tmp_path / "runs" / "cache" / "candidates.sqlite").is_file()
    finally:
        pool.close()


def test_openai_example_config_loads_and_points_at_loopback():
    pool = load_pool(CONFIG_DIR / "openai_example.yaml")
    try:
        assert isinstance(pool.backend, OpenAIBackend)
        assert pool.backend.base_url.startswith("http://127.0.0.1:")
    finally:
        pool.close()


# --- a misbehaving server gets bounded time, memory and cost; no reply can poison a run ------------

def test_a_body_sent_a_byte_at_a_time_gets_one_whole_call_deadline(server):
    server.script("drip")
    start = time.monotonic()
    record = call_one(make_pool(server.base_url, timeout_s=0.5, max_retries=0))
    assert time.monotonic() - start < 3  # the body takes over 5 s to arrive whole
    assert "timeout" in record.error and record.cost == 0


def test_a_huge_reply_fails_at_the_byte_limit_without_a_retry(server):
    server.script("huge")
    record = call_one(make_pool(server.base_url, max_reply_bytes=100_000))
    assert "max_reply_bytes" in record.error and server.requests == 1 and record.cost == 0


def test_a_lone_surrogate_in_a_reply_is_replaced(server):
    server.script("surrogate")
    record = call_one(make_pool(server.base_url))
    assert record.error is None and record.reply == "bad \ufffd char"
    record.reply.encode("utf-8")  # encodable, so any tokenizer takes it


def test_reported_usage_is_clamped_to_the_requests_max_tokens(server, caplog):
    server.script("usage_lie")
    record = call_one(make_pool(server.base_url))
    assert record.completion_tokens == RequestConfig().max_tokens
    assert "reported 1000000000000 completion tokens" in caplog.text


def test_a_key_echoed_late_or_url_encoded_is_redacted_before_the_error_is_cut(server):
    server.script("echo_key")
    record = call_one(make_pool(server.base_url, max_retries=0))
    assert "HTTP 401" in record.error
    assert not any(KEY[:n] in record.error for n in (6, 12, 18)), record.error
    assert "sk-test" not in record.error and "sk%2Dtest" not in record.error


def test_a_key_read_with_a_trailing_cr_is_stripped(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY + "\r\n")
    record = call_one(make_pool(server.base_url))
    assert record.error is None and server.authorizations[-1] == f"Bearer {KEY}"


def test_a_key_with_control_characters_inside_is_refused_without_printing_it(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-abc\ndef")
    record = call_one(make_pool(server.base_url))
    assert KEY_ENV in record.error and "control characters" in record.error
    assert "sk-abc" not in record.error and server.requests == 0


def test_a_reply_that_echoes_the_key_is_redacted_before_the_ledger_or_the_context_sees_it(server):
    record = call_one(make_pool(server.base_url), query=f"repeat {KEY} please")
    assert record.error is None and KEY not in record.reply and "***" in record.reply
