"""Serving benchmark: p50/p99 latency and requests per second of serve.py at 1, 8 and 64 concurrent
clients (the official async `openai` client, closed loop), with zero-latency candidates, against one
bare episode through the same rollout path. Prints a table and writes runs/bench/serve_<gpu|cpu>_<date>.json.

    python -m bench.serve                 # CPU: the main job's checkpoint (python train.py first)
    python -m bench.serve --random-0.5b   # GPU: a random Qwen2.5-0.5B-shaped policy, forced turns

On CPU the policy is runs/routeworld_tiny/checkpoints/best/policy on RouteWorld's test questions (its
simulated candidates answer at once). On a GPU, a random bf16 policy writes a forced call at policy
tokens 16 and 48 and an answer at 80 (random weights never write tags), served by the FastEngine.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import openai
import torch

import serve
from agents.rollout import ForcedSchedule, run_rollouts
from agents.routing_settings import RoutingSettings, save_routing_settings
from agents.serving import episode_result
from bench.common import bpe_tokenizer, random_qwen, table, write_results
from bench.rollout import CORPUS, REPLY
from envs.candidates import CandidatePool, CandidateSpec
from envs.candidates.simulated import SimulatedBackend
from envs.episode import EpisodeConfig
from envs.vector import MultiRouteVectorEnv

MAIN_JOB = Path("runs/routeworld_tiny/checkpoints/best/policy")
FORCED = ([16, 48], 80)  # forced call positions and answer position of the random policy


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main_job_server(policy: Path, max_batch: int, engine: str) -> tuple[serve.Server, list[str]]:
    """The main job's policy on RouteWorld with its own simulated candidates, and its test questions."""
    if not (policy / "config.json").is_file():
        raise SystemExit(f"bench.serve: no checkpoint at {policy}; make one with `python train.py` (~5 minutes on "
                         "2 CPU cores), or give --policy DIR")
    server = serve.build_server(serve.ServeConfig(policy=str(policy), task="routeworld", max_batch=max_batch,
                                                  engine=engine))
    return server, [q["question"] for q in serve.trained_world(policy).questions("test")]


def random_policy_server(folder: Path, max_batch: int) -> tuple[serve.Server, list[str]]:
    """A random Qwen2.5-0.5B-shaped policy saved as a checkpoint (weights, tokenizer, routing.json),
    one zero-latency candidate, and a schedule that writes two calls and an answer into every episode."""
    tok = bpe_tokenizer(CORPUS, 500)
    specs = [CandidateSpec("Expert", "expert", 7, 0.3)]
    episode = EpisodeConfig(max_turns=2, max_response_tokens=128, max_info_tokens=64, prompt_template="compact")
    random_qwen("0.5b").save_pretrained(folder)
    tok.save_pretrained(folder)
    save_routing_settings(folder, RoutingSettings.from_episode(episode, specs))
    pool = CandidatePool(specs, SimulatedBackend({"Expert": lambda r: REPLY}))
    forced = ForcedSchedule.calls_then_answer(tok, "Expert", *FORCED)
    cfg = serve.ServeConfig(policy=str(folder), max_batch=max_batch, dtype="bfloat16", max_len=1024)
    questions = [f"{i}: In which country is Korvan? Where is Paris?" for i in range(256)]
    return serve.build_server(cfg, pool=pool, forced=forced), questions


def bare_episodes(server: serve.Server, questions: list[str]) -> tuple[list[float], list[str]]:
    """Seconds and trajectory of each question's episode alone, through the service's rollout path
    (its model and engine, with no HTTP and no scheduler), while the service is idle."""
    s = server.service
    env = MultiRouteVectorEnv(s.tokenizer, s.pool, s.cfg)
    seconds, trajectories = [], []
    for q in questions:
        t = time.perf_counter()
        run_rollouts(s.model, env, [{"question": q, "golden_answers": [""]}], 0.0, 1.0, 0, 0,
                     s.tokenizer.pad_token_id, forced=s.forced, engine=s.engine)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
        trajectories.append(episode_result(env.episodes[0])["trajectory"])
    return seconds, trajectories


def bare_batch(server: serve.Server, questions: list[str]) -> float:
    """Episodes per second of one phase of all `questions` through the service's rollout path: what
    batching can gain at most over `bare_episodes`."""
    s = server.service
    env = MultiRouteVectorEnv(s.tokenizer, s.pool, s.cfg)
    t = time.perf_counter()
    run_rollouts(s.model, env, [{"question": q, "golden_answers": [""]} for q in questions], 0.0, 1.0, 0, 0,
                 s.tokenizer.pad_token_id, forced=s.forced, engine=s.engine)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(questions) / (time.perf_counter() - t)


def load(url: str, questions: list[str], clients: int, per_client: int) -> dict:
    """`clients` closed-loop clients, each sending `per_client` requests one after the other, from a
    process of their own (the clients' Python does not compete with the server's for its GIL)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_load, (url, questions, clients, per_client))


def _load(url: str, questions: list[str], clients: int, per_client: int) -> dict:
    return asyncio.run(_clients(url, questions, clients, per_client))


async def _clients(url: str, questions: list[str], clients: int, per_client: int) -> dict:
    c = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    latencies, failures, answers = [], [], {}

    async def client(k: int) -> None:
        for j in range(per_client):
            i = (k * per_client + j) % len(questions)
            t = time.perf_counter()
            try:
                r = await c.chat.completions.create(model="router",
                                                    messages=[{"role": "user", "content": questions[i]}])
                latencies.append(time.perf_counter() - t)
                answers[i] = r.model_extra["routing"]["trajectory"]
            except openai.APIError as e:
                failures.append(f"{type(e).__name__}: {e}")
    start = time.perf_counter()
    await asyncio.gather(*[client(k) for k in range(clients)])
    wall = time.perf_counter() - start
    await c.close()
    return {"clients": clients, "requests": clients * per_client, "failed": len(failures),
            "first_failure": failures[0] if failures else None, "p50_ms": 1e3 * percentile(latencies, 50),
            "p99_ms": 1e3 * percentile(latencies, 99), "req_s": len(latencies) / wall, "wall_s": wall,
            "answers": answers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default=str(MAIN_JOB), help="CPU: the trained policy folder")
    p.add_argument("--random-0.5b", dest="random", action="store_true",
                   help="a random Qwen2.5-0.5B-shaped policy with forced turns (GPU)")
    p.add_argument("--engine", default="auto", choices=("auto", "fast", "simple"),
                   help="CPU: the rollout path (auto: the simple path; fast: the FastEngine, eager)")
    p.add_argument("--concurrency", default="1,8,64", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=4, help="requests per client (at least 16 per level)")
    p.add_argument("--bare", type=int, default=16, help="bare episodes timed (and questions at concurrency 1)")
    p.add_argument("--tag", default="", help="written to runs/bench/serve_<tag>_<gpu|cpu>_<date>.json")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        server, questions = (random_policy_server(Path(tmp), max(levels)) if args.random
                             else main_job_server(Path(args.policy), max(levels), args.engine))
        with serve.running(server) as url:
            warm = load(url, questions, max(levels), 1)  # graphs captured, caches filled
            bare_s, bare_traj = bare_episodes(server, questions[:max(args.bare, max(levels))])
            batch_eps = bare_batch(server, questions[:max(levels)])
            rows = [load(url, questions, c, max(args.requests, -(-16 // c))) for c in levels]
            stats = dict(server.service.stats)
    bare = {"p50_ms": 1e3 * statistics.median(bare_s[:args.bare]), "p99_ms": 1e3 * percentile(bare_s[:args.bare], 99)}
    top = rows[-1]
    differ = sum(top["answers"][i] != bare_traj[i] for i in range(len(bare_traj)) if i in top["answers"])
    compared = sum(i in top["answers"] for i in range(len(bare_traj)))
    one = next((r for r in rows if r["clients"] == 1), None)
    summary = {
        "bare_episode_p50_ms": bare["p50_ms"], "bare_episode_p99_ms": bare["p99_ms"],
        "c1_p50_over_bare": one["p50_ms"] / bare["p50_ms"] if one else None,
        f"bare_batch{max(levels)}_eps_over_bare_episode": batch_eps * statistics.mean(bare_s),
        f"c{top['clients']}_req_s_over_c1": top["req_s"] / one["req_s"] if one else None,
        "failed_requests": sum(r["failed"] for r in rows) + warm["failed"],
        f"answers_differing_c{top['clients']}_vs_alone": f"{differ}/{compared}",
    }
    print(table([{k: v for k, v in r.items() if k != "answers"} for r in rows],
                ["clients", "requests", "failed", "p50_ms", "p99_ms", "req_s"]))
    print("\n".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items()))
    kind = "_".join(filter(None, ["serve", args.tag]))
    path = write_results(kind, {"policy": "random 0.5b, forced turns" if args.random else args.policy,
                                "device": str(server.service.model.device), "engine": "fast" if server.service.engine
                                else "simple", "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                                "load_average": os.getloadavg(), "levels": levels,
                                "rows": [{k: v for k, v in r.items() if k != "answers"} for r in rows],
                                "summary": summary, "service_stats": stats})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
