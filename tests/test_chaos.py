"""Chaos: a short training run and an evaluation whose candidates sit behind a loopback server that
injects every fault of `envs.candidates.fault_server` at random. Nothing crashes or hangs, every HTTP
request is accounted for, nothing is charged for a failed call or beyond what a request allowed, the
failed-call rate is reported, and the API key is nowhere in what the runs wrote.
`python -m bench.chaos` is the longer version, with a table of faults against outcomes."""

import json
import time

import pytest

import evaluate
import train
from agents.config import load_config
from agents.distributed import init_distributed
from envs.candidates.fault_server import (
    FAULTS,
    audited_pool,
    serve_openai,
    world_answer,
)
from envs.candidates.pool import MAX_REPLY_CHARS
from envs.candidates.spec import RequestConfig
from envs.tasks import make_task

pytestmark = pytest.mark.chaos

KEY = "sk-chaos-0123456789abcdef"
MIX = {fault: 0.06 for fault in FAULTS}  # 72% of requests meet a fault, about 30% of calls fail for good
FAST_FAULTS = {"hang_s": 2.0, "retry_after": "0"}  # a hang outlasts the client's 1 s deadline
CLIENT = {"api_key_env": "CHAOS_KEY", "timeout_s": 1.0, "max_retries": 1, "backoff_base_s": 0.01,
          "max_reply_bytes": 3_000_000, "max_concurrency": 32}
MAX_TOKENS = 64


def check_ledger(records: list, server) -> None:
    attempts = sum(r.attempts for r in records)
    # every request the server saw is an attempt in the ledger; on a heavily loaded machine an attempt
    # can time out still queued in the listen backlog, so the server never sees it (idle: equal)
    assert records and attempts - 0.05 * attempts <= server.requests <= attempts
    failed = [r for r in records if r.error]
    assert 0 < len(failed) < len(records)
    assert all(r.cost == 0 and r.reply == "" for r in failed)
    assert all(r.completion_tokens <= MAX_TOKENS for r in records)  # a reported 10**12 is clamped
    assert all(len(r.reply) <= MAX_REPLY_CHARS + len(" [cut]") for r in records)
    assert any(r.reply.endswith(" [cut]") for r in records) == (server.served["huge"] > 0)
    assert not any("\udcff" in r.reply for r in records)
    assert not any(KEY in (r.error or "") or KEY in r.reply for r in records)


def no_key_under(path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f


def test_training_through_a_faulty_server_finishes_and_reports_failed_calls(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CHAOS_KEY", KEY)
    cfg = load_config("configs/routeworld_tiny.yaml", [  # test_learning.py's easy run: the policy calls
        f"run_dir={tmp_path}", "device=cpu", "task.world_preset=easy", "task.n_test=16", "episode.max_turns=1",
        "episode.max_response_tokens=56", "sft.n_examples=400", "sft.epochs=8", "rollout.n_prompts=16",
        "algorithm.minibatch_size=16", "total_steps=3", "eval_every=0", "save_every=0"])
    task = make_task(cfg)
    with serve_openai(api_key=KEY, mix=MIX, seed=1, answer=world_answer(task.extra["world"]), **FAST_FAULTS) as server:
        task.pool, records = audited_pool(task.pool.specs, server.base_url, CLIENT,
                                          RequestConfig(template="{query}", max_tokens=MAX_TOKENS))
        start = time.monotonic()
        try:
            train.train(cfg, task, init_distributed("cpu"), tmp_path, resume=False)
        finally:
            task.pool.close()
        assert time.monotonic() - start < 240  # about 35 s on an idle 2-core machine: a hang fails it
    assert all(server.served[f] for f in FAULTS), server.served
    check_ledger(records, server)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = [s["train/call_error_rate"] for s in steps if "train/call_error_rate" in s]
    assert len(rates) == 3 and all(0 <= r < 1 for r in rates) and sum(rates) > 0
    final = json.loads((tmp_path / "results.json").read_text())
    assert 0 < final["trained policy"]["eval/call_error_rate"] < 1
    assert "first error" in caplog.text
    no_key_under(tmp_path)
    assert KEY not in caplog.text


def test_an_evaluation_through_a_faulty_server_counts_every_failed_call(tmp_path, monkeypatch):
    monkeypatch.setenv("CHAOS_KEY", KEY)
    questions = tmp_path / "test.jsonl"
    questions.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "golden_answers": [str(2 * i)]})
                                 + "\n" for i in range(24)))
    with serve_openai(api_key=KEY, mix=MIX, seed=2, **FAST_FAULTS) as server:
        pool = tmp_path / "pool.yaml"
        pool.write_text(json.dumps({
            "candidates": [{"name": "Small", "model": "small", "params_b": 1, "price_per_1m_output": 0.1},
                           {"name": "Large", "model": "large", "params_b": 70, "price_per_1m_output": 1.0}],
            "backend": {"kind": "openai", "base_url": server.base_url, **CLIENT},
            "request": {"max_tokens": MAX_TOKENS}}))
        from envs.candidates import pool as pool_module
        records = []
        real_init = pool_module.CandidatePool.__init__

        def init(self, *args, **kwargs):  # audit the ledger of the pool evaluate.py builds
            real_init(self, *args, **kwargs)
            self.on_record(records.append)
        monkeypatch.setattr(pool_module.CandidatePool, "__init__", init)
        start = time.monotonic()
        config = tmp_path / "eval.yaml"
        config.write_text(json.dumps({"task": "qa", "pool": str(pool), "test_files": [{"path": str(questions)}],
                                      "outcome_matrix": False, "routers": {"answer_mode": "reply"}}))
        result = evaluate.main(["--config", str(config), "--routers", "largest,cheapest,random",
                                "--out", str(tmp_path / "out")])
        assert time.monotonic() - start < 60
    check_ledger(records, server)
    failed = sum(r.error is not None for r in records)
    rows = result["rows"]
    assert sum(row["metrics"]["call_error_rate"] * row["metrics"]["calls"] for row in rows) == pytest.approx(failed)
    assert all(0 <= row["metrics"]["call_error_rate"] < 1 for row in rows)
    no_key_under(tmp_path)
