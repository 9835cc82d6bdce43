"""Chaos: every fault of `envs.candidates.fault_server` against the openai backend, one at a time, then
mixed into a training run and an evaluation. Prints a table of faults against outcomes and writes JSON.

    python -m bench.chaos                       # ~2 minutes on 2 CPU cores
    python -m bench.chaos --steps 20 --calls 64 --out runs/chaos

Per fault: `--calls` calls with every request meeting that fault; the client has a 1 s whole-call
deadline and one retry. A row reports the requests the server saw against the attempts the pool
recorded (equal: nothing unaccounted for), the calls that failed for good and their error kind, the
slowest call, the cost charged (nothing for a failed call, never beyond `max_tokens`), whether a
reply was cut, and whether the API key showed up in any error, reply or written file.
`tests/test_chaos.py` is the short version run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

from agents.call_errors import error_kind
from envs.atomic import write_text_atomic
from envs.candidates.fault_server import (
    FAULTS,
    audited_pool,
    serve_openai,
    world_answer,
)
from envs.candidates.pool import CandidatePool
from envs.candidates.spec import CandidateSpec, RequestConfig
from rewards.table import markdown_table

KEY_ENV = "CHAOS_BENCH_KEY"
KEY = "sk-chaos-bench-0123456789abcdef"
CLIENT = {"api_key_env": KEY_ENV, "timeout_s": 1.0, "max_retries": 1, "backoff_base_s": 0.01,
          "max_reply_bytes": 3_000_000, "max_concurrency": 32}
SERVER = {"api_key": KEY, "hang_s": 2.0, "retry_after": "0"}
MAX_TOKENS = 64
SPECS = [CandidateSpec("Small", "small", 1, 0.1), CandidateSpec("Large", "large", 70, 1.0)]


def outcome(records: list, requests: int, wall_s: float) -> dict:
    failed = [r for r in records if r.error]
    return {
        "calls": len(records), "requests": requests, "attempts": sum(r.attempts for r in records),
        "failed": len(failed), "error_kinds": dict(Counter(error_kind(r.error) for r in failed)),
        "slowest_call_s": max((r.latency_s for r in records), default=0.0), "wall_s": wall_s,
        "charged": sum(r.cost for r in records), "failed_charged": sum(r.cost for r in failed),
        "max_completion_tokens": max((r.completion_tokens for r in records), default=0),
        "replies_cut": sum(r.reply.endswith(" [cut]") for r in records),
        "key_leaked": any(KEY in (r.error or "") or KEY in r.reply for r in records),
    }


def one_fault(fault: str | None, n_calls: int) -> dict:
    with serve_openai(mix={fault: 1.0} if fault else None, **SERVER) as server:
        pool, records = audited_pool(SPECS, server.base_url, CLIENT, RequestConfig(max_tokens=MAX_TOKENS))
        start = time.monotonic()
        pool.call_many([(SPECS[i % 2].name, f"question {i}", "") for i in range(n_calls)])
        pool.close()
        return outcome(records, server.requests, time.monotonic() - start)


def key_in_files(root: Path) -> bool:
    return any(KEY.encode() in f.read_bytes() for f in root.rglob("*") if f.is_file())


def mixed_training(steps: int, run_dir: Path) -> dict:
    """The easy RouteWorld run of tests/test_learning.py, its candidates served over HTTP with every fault mixed in."""
    import train
    from agents.config import load_config
    from agents.distributed import init_distributed
    from envs.tasks import make_task
    cfg = load_config("configs/routeworld_tiny.yaml", [
        f"run_dir={run_dir}", "device=cpu", "task.world_preset=easy", "task.n_test=32", "episode.max_turns=1",
        "episode.max_response_tokens=56", "sft.n_examples=400", "sft.epochs=8", "rollout.n_prompts=32",
        "algorithm.minibatch_size=16", f"total_steps={steps}", "eval_every=0", "save_every=0"])
    task = make_task(cfg)
    with serve_openai(mix={f: 0.06 for f in FAULTS}, answer=world_answer(task.extra["world"]), **SERVER) as server:
        task.pool, records = audited_pool(task.pool.specs, server.base_url, CLIENT,
                                          RequestConfig(template="{query}", max_tokens=MAX_TOKENS))
        start = time.monotonic()
        try:
            train.train(cfg, task, init_distributed("cpu"), run_dir, resume=False)
        finally:
            task.pool.close()
        row = outcome(records, server.requests, time.monotonic() - start)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    row["train_call_error_rate"] = [round(m["train/call_error_rate"], 3) for m in logged if "train/call_error_rate" in m]
    row["key_leaked"] = row["key_leaked"] or key_in_files(run_dir)
    return row


def mixed_evaluation(n_questions: int, out: Path) -> dict:
    """largest, cheapest and random on `n_questions` local questions, through every fault mixed in."""
    import evaluate
    questions = out / "questions.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    questions.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "golden_answers": [str(2 * i)]})
                                 + "\n" for i in range(n_questions)))
    with serve_openai(mix={f: 0.06 for f in FAULTS}, **SERVER) as server:
        pool_file, config = out / "pool.yaml", out / "eval.yaml"
        pool_file.write_text(json.dumps({
            "candidates": [{"name": s.name, "model": s.model, "params_b": s.params_b,
                            "price_per_1m_output": s.price_per_1m_output} for s in SPECS],
            "backend": {"kind": "openai", "base_url": server.base_url, **CLIENT},
            "request": {"max_tokens": MAX_TOKENS}}))
        config.write_text(json.dumps({"task": "qa", "pool": str(pool_file), "test_files": [{"path": str(questions)}],
                                      "outcome_matrix": False, "routers": {"answer_mode": "reply"}}))
        records = []
        init = CandidatePool.__init__

        def recording_init(self, *a, **k):  # audit the ledger of the pool evaluate.py builds
            init(self, *a, **k)
            self.on_record(records.append)
        CandidatePool.__init__ = recording_init
        start = time.monotonic()
        try:
                result = evaluate.main(["--config", str(config), "--routers", "largest,cheapest,random",
                                    "--out", str(out / "eval")])
        finally:
            CandidatePool.__init__ = init
        row = outcome(records, server.requests, time.monotonic() - start)
    reported = sum(r["metrics"]["call_error_rate"] * r["metrics"]["calls"] for r in result["rows"])
    assert round(reported) == row["failed"], (reported, row["failed"])  # the table counts every failed call
    row["call_error_rate"] = {r["router"]: round(r["metrics"]["call_error_rate"], 3) for r in result["rows"]}
    row["key_leaked"] = row["key_leaked"] or key_in_files(out)
    return row


def table(rows: dict[str, dict]) -> str:
    body = []
    for name, r in rows.items():
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(r.get("error_kinds", {}).items()))
        body.append([name, r["calls"], f"{r['requests']} / {r.get('attempts', '-')}",
                     f"{r['failed']}{f' ({kinds})' if kinds else ''}", f"{r.get('slowest_call_s', 0):.2f}",
                     f"{r.get('charged', 0):.2f}", r.get("max_completion_tokens", "-"), r.get("replies_cut", "-"),
                     r["key_leaked"]])
    return markdown_table(["fault", "calls", "requests / attempts", "failed (kind)", "slowest call s", "charged µ$",
                           "max tokens", "cut", "key leaked"], body)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=32, help="calls per single-fault row")
    p.add_argument("--steps", type=int, default=10, help="PPO steps of the mixed training run")
    p.add_argument("--questions", type=int, default=64, help="questions of the mixed evaluation")
    p.add_argument("--out", default="runs/chaos")
    args = p.parse_args(argv)
    os.environ[KEY_ENV] = KEY
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {fault or "none": one_fault(fault, args.calls) for fault in (None, *FAULTS)}
    with tempfile.TemporaryDirectory() as tmp:
        rows["mix: training"] = mixed_training(args.steps, Path(tmp) / "train")
        rows["mix: evaluation"] = mixed_evaluation(args.questions, Path(tmp) / "eval")
    text = table(rows)
    print(text)
    for name in ("mix: training", "mix: evaluation"):
        print(f"{name}: wall {rows[name]['wall_s']:.1f}s, failed-call rate "
              f"{rows[name].get('train_call_error_rate', rows[name].get('call_error_rate'))}")
    write_text_atomic(out / "chaos.json", json.dumps(rows, indent=1))
    write_text_atomic(out / "chaos.md", text + "\n")
    return rows


if __name__ == "__main__":
    main()
