"""serve.py through the official `openai` client against a server on a free loopback port: answers,
streaming, batching (concurrent answers equal each question's sequential greedy one), equality with
evaluate.py's `policy:DIR`, auth, every refused request, limits, failing candidates, the cache, and
a graceful shutdown. The policy is a tiny warm-started one, built here in a few seconds."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch
import yaml
from tiny import TINY_RUN
from transformers import AutoModelForCausalLM, Qwen2Config

import evaluate
import serve
from agents.config import load_config, redacted
from agents.rollout import ForcedSchedule, run_rollouts
from agents.routers import make_router
from agents.routers.llm import load_tokenizer
from agents.routing_settings import RoutingSettings, save_routing_settings
from agents.serving import episode_result
from agents.sft import play_scripted, sft_train
from envs.candidates.fault_server import closed_port_url
from envs.candidates.pool import CandidatePool
from envs.candidates.simulated import SimulatedBackend
from envs.prompts import build_prompt
from envs.tasks import make_task
from envs.vector import MultiRouteVectorEnv
from rewards import extract_answer

KEY_ENV, KEY = "ROUTERL_SERVE_TEST_KEY", "sk-serve-test-3c9e-do-not-leak"
RUN = [*TINY_RUN, "episode.max_response_tokens=48"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint as train.py writes it (config.yaml beside policy/, routing.json in it): a one-layer
    Qwen2 warm-started on 400 scripted RouteWorld trajectories, so greedy episodes call candidates
    and answer (some malformed), deterministically in float32."""
    root = tmp_path_factory.mktemp("checkpoint")
    cfg = load_config("configs/routeworld_tiny.yaml", RUN)
    (root / "config.yaml").write_text(yaml.safe_dump(redacted(cfg), sort_keys=False))
    task = make_task(cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=len(task.tokenizer), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, initializer_range=0.1), attn_implementation="sdpa")
    rng = np.random.default_rng(0)
    examples = [task.train[int(i)] for i in rng.integers(len(task.train), size=400)]
    env = MultiRouteVectorEnv(task.tokenizer, task.pool, cfg.episode)
    episodes = play_scripted(env, examples, task.script, rng, max_chunks=cfg.episode.max_turns + 2)
    sft_train(model, episodes, task.tokenizer.pad_token_id, epochs=6, lr=3e-3, batch_size=16, seed=0)
    model.eval().save_pretrained(root / "policy")
    task.tokenizer.save_pretrained(root / "policy")
    save_routing_settings(root / "policy", RoutingSettings.from_episode(cfg.episode, task.pool.specs))
    task.pool.close()
    return root / "policy"


@pytest.fixture(scope="module")
def questions():
    """64 questions of the world the policy was trained in (held-out ones first)."""
    task = make_task(load_config("configs/routeworld_tiny.yaml", RUN))
    task.pool.close()
    return [q["question"] for q in (task.test + task.val + task.train)[:64]]


def config(policy, **kw) -> serve.ServeConfig:
    return serve.ServeConfig(policy=str(policy), **{"task": "routeworld", **kw})


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = serve.build_server(config(checkpoint))
    with serve.running(srv) as url:
        yield srv, url


def client(url: str, key: str = "unused", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, **kw)


def ask(c, question: str, **kw):
    return c.chat.completions.create(model="router", messages=[{"role": "user", "content": question}], **kw)


def ask_all(url: str, questions: list[str]) -> list:
    """Every question at once, from one event loop (the official async client)."""
    async def gather():
        c = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        return await asyncio.gather(*[c.chat.completions.create(
            model="router", messages=[{"role": "user", "content": q}]) for q in questions])
    return asyncio.run(gather())


def alone(policy, questions: list[str], conditions: list[dict] | None = None) -> list[dict]:
    """Each question's greedy episode run alone (a batch of one) through the simple rollout path,
    under its own conditions (alpha, max_cost) where given."""
    model, tok = make_router(f"policy:{policy}", None).load("cpu")
    settings = serve.load_routing_settings(policy)
    pool = serve.task_pool(policy, "routeworld")
    env = MultiRouteVectorEnv(tok, pool, settings.episode_config())
    out = []
    for q, extra in zip(questions, conditions or [{}] * len(questions)):
        run_rollouts(model, env, [{"question": q, "golden_answers": [""], **extra}], 0.0, 1.0, 0, 0, tok.pad_token_id)
        out.append(episode_result(env.episodes[0]))
    pool.close()
    return out


def test_the_policys_tokenizer_loads_as_it_was_trained(checkpoint, questions):
    """The world's BPE saved beside a Qwen2 policy gives a prompt the ids it had in training
    (AutoTokenizer would load it as Qwen2Tokenizer, which splits the prices' digits one by one)."""
    cfg = load_config("configs/routeworld_tiny.yaml", RUN)
    task = make_task(cfg)
    task.pool.close()
    _, loaded = make_router(f"policy:{checkpoint}", None).load("cpu")
    prompt = build_prompt(questions[0], task.pool.specs, cfg.episode.prompt_template, cfg.episode.max_turns)
    assert "$0.05/M" in prompt and loaded.encode(prompt) == task.tokenizer.encode(prompt)


def test_an_answer_carries_the_routing_of_its_episode(server, questions):
    srv, url = server
    r = next(r for r in (ask(client(url), q) for q in questions) if r.model_extra["routing"]["calls"])
    routing = r.model_extra["routing"]
    assert r.choices[0].message.content == (extract_answer(routing["trajectory"]) or "")
    assert routing["end_reason"] == "answer" and r.choices[0].finish_reason == "stop"
    assert routing["calls"] and {"candidate", "query", "reply", "completion_tokens", "cost", "latency_s",
                                 "error"} <= set(routing["calls"][0])
    assert routing["total_cost"] == pytest.approx(sum(c["cost"] for c in routing["calls"]))
    # usage counts the policy's own tokens: the trajectory minus the <info> blocks the env inserted
    assert 0 < r.usage.completion_tokens < len(srv.service.tokenizer.encode(routing["trajectory"]))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_a_streamed_answer_equals_the_unstreamed_one(server, questions):
    _, url = server
    c = client(url)
    for q in questions[:4]:
        whole = ask(c, q)
        chunks = list(ask(c, q, stream=True, stream_options={"include_usage": True}))
        content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        trajectory = "".join((ch.model_extra or {}).get("trajectory") or "" for ch in chunks)
        last = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason][-1]
        assert content == whole.choices[0].message.content
        assert trajectory == whole.model_extra["routing"]["trajectory"] == last.model_extra["routing"]["trajectory"]
        assert last.choices[0].finish_reason == whole.choices[0].finish_reason
        assert chunks[-1].usage == whole.usage and not chunks[-1].choices


def test_64_concurrent_requests_share_batches_and_equal_their_sequential_greedy_answers(server, checkpoint, questions):
    srv, url = server
    before = srv.service.stats["most_running"]
    answers = ask_all(url, questions)
    assert srv.service.stats["most_running"] >= max(before, 32)  # they ran together, not one by one
    expected = alone(checkpoint, questions)
    got = [(a.choices[0].message.content, a.model_extra["routing"]["trajectory"]) for a in answers]
    assert got == [(e["answer"] or "", e["trajectory"]) for e in expected]
    # a policy that routes: calls and well-formed answers among them (17 and 10 when written)
    assert sum(len(e["calls"]) for e in expected) >= 8 and sum(e["answer"] is not None for e in expected) >= 5
    assert len({e["trajectory"] for e in expected}) >= 8  # 17 distinct ones when written


def test_the_servers_answers_equal_evaluate_policy_results(tmp_path, server, checkpoint):
    """evaluate.py's `policy:DIR` on RouteWorld test questions and the server on the same questions:
    the same answers (None where malformed), calls and costs, question by question."""
    _, url = server
    trained = load_config("configs/routeworld_tiny.yaml", RUN)
    cfg = evaluate.EvalConfig(task="routeworld", world_preset="easy", max_questions=16, episode=trained.episode,
                              cost_normalizer="budget", cost_options={"budget": 150.0}, batch_size=5)
    task = evaluate.build_task(cfg)
    try:
        router = make_router(f"policy:{checkpoint}", None)
        router.name_spec = f"policy:{checkpoint}"  # as evaluate_routers names it
        records = evaluate.play_llm_router(router, cfg, task, None, type("Bar", (), {"update": lambda *a: None})())
    finally:
        task.pool.close()
    c = client(url)
    for q, rec in zip(task.test, records):
        routing = ask(c, q["question"]).model_extra["routing"]
        answer = None if routing["format_errors"] else extract_answer(routing["trajectory"])
        assert (answer, [x["candidate"] for x in routing["calls"]]) == (rec["answer"], rec["called"])
        assert routing["total_cost"] == pytest.approx(rec["raw_cost"])
        assert (not routing["format_errors"]) == rec["format_ok"]
    assert any(r["answer"] for r in records) and any(r["called"] for r in records)


def test_models_and_health(server):
    _, url = server
    assert [m.id for m in client(url).models.list()] == ["router"]
    health = httpx.get(url.removesuffix("/v1") + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_a_bearer_key_is_required_when_set_and_never_shown(checkpoint, questions, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, f"  {KEY}\n")  # stripped when read
    srv = serve.build_server(config(checkpoint, api_key_env=KEY_ENV))
    caplog.set_level(logging.DEBUG)
    with serve.running(srv) as url:
        for key in ("wrong-key", KEY + "x"):
            with pytest.raises(openai.AuthenticationError) as e:
                ask(client(url, key), questions[0])
            assert "Authorization: Bearer" in str(e.value) and KEY not in str(e.value)
        missing = httpx.post(f"{url}/chat/completions", json={"messages": [{"role": "user", "content": "q"}]})
        assert missing.status_code == 401 and KEY not in missing.text
        assert ask(client(url, KEY), questions[0]).choices[0].message.content is not None
        assert [m.id for m in client(url, KEY).models.list()] == ["router"]
    assert KEY not in caplog.text


def test_a_default_cost_weight_for_an_unconditioned_policy_is_refused_at_start(checkpoint):
    with pytest.raises(ValueError, match="--cost-weight: this policy was trained at alpha=0.0 only"):
        serve.build_server(config(checkpoint, cost_weight=0.5))


def test_an_unset_key_variable_stops_the_server_naming_only_the_variable(checkpoint, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"--api-key-env {KEY_ENV}: the environment variable is not set"):
        serve.build_server(config(checkpoint, api_key_env=KEY_ENV))


Q = [{"role": "user", "content": "q?"}]
BAD = [  # (request body, status, words of the message)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"model": "router", "messages": [{"role": "system", "content": "hi"}]}, 400, "no message with role 'user'"),
    ({"model": "router"}, 400, "'messages' is required"),
    ({"model": "router", "messages": "In which country is X?"}, 400, "'messages' must be a list"),
    ({"model": "router", "messages": [{"role": "user", "content": 42}]}, 400, "'messages[0].content' must be a string"),
    ({"model": "router", "messages": Q, "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"model": "router", "messages": Q, "cost_weight": "low"}, 400, "'cost_weight' must be a number"),
    ({"model": "router", "messages": Q, "n": 2}, 400, "'n' must be 1"),
    ({"model": "gpt-4o", "messages": Q}, 404, "model 'gpt-4o' is not served"),
    ({"model": "router", "messages": Q, "cost_weight": 0.5}, 400, "trained at alpha=0.0 only"),
    ({"model": "router", "messages": Q, "max_cost": 20}, 400, "trained without a spending cap (at alpha=0.0)"),
    ({"model": "router", "messages": [{"role": "user", "content": "word " * 5000}]}, 413,
     "passes the policy's context of 4096 tokens"),
    ({"model": "router", "messages": [{"role": "user", "content": "x" * (1 << 20)}]}, 413,
     "over the limit max_request_bytes=1048576"),
]


@pytest.mark.parametrize("body, status, message", BAD, ids=[b[2] for b in BAD])
def test_a_bad_request_is_refused_naming_the_field_or_limit(server, body, status, message):
    _, url = server
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/chat/completions", content=data, headers={"content-type": "application/json"})
    assert r.status_code == status and message in r.json()["error"]["message"], r.text


def test_the_openai_client_sees_each_refusal_as_its_error(server):
    _, url = server
    c = client(url)
    with pytest.raises(openai.BadRequestError, match="no message with role 'user'"):
        c.chat.completions.create(model="router", messages=[{"role": "system", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="trained at alpha=0.0 only"):
        ask(c, "In which country is X?", extra_body={"cost_weight": 0.3})
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "q?"}])


def slowed(policy, latency_s: float) -> CandidatePool:
    """RouteWorld's candidates as trained, answering after `latency_s` seconds."""
    pool = serve.task_pool(policy, "routeworld")
    return CandidatePool(pool.specs, SimulatedBackend(pool.backend.responders, latency_s=latency_s))


def calling(policy) -> ForcedSchedule:
    """Every episode calls Geo-Expert at its second token and answers at its 40th (a slow or failing
    candidate then holds or fails every episode)."""
    return ForcedSchedule.calls_then_answer(load_tokenizer(policy), "Geo-Expert", [1], 40)


def test_beyond_max_concurrent_a_request_gets_429_naming_the_limit(checkpoint, questions):
    srv = serve.build_server(config(checkpoint, max_concurrent=2, max_batch=2), pool=slowed(checkpoint, 1.0),
                             forced=calling(checkpoint))
    with serve.running(srv) as url:
        results = [None] * 3

        def one(i):
            try:
                results[i] = ask(client(url), questions[i]).choices[0].message.content
            except openai.RateLimitError as e:
                results[i] = e
        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.2)
        for t in threads:
            t.join()
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(refused) == 1 and "max_concurrent=2" in str(refused[0])
    assert refused[0].response.headers["retry-after"] == "1"


def test_a_request_past_its_timeout_gets_504_and_its_episode_ends(checkpoint, questions):
    srv = serve.build_server(config(checkpoint, request_timeout_s=0.3), pool=slowed(checkpoint, 1.5),
                             forced=calling(checkpoint))
    with serve.running(srv) as url:
        with pytest.raises(openai.InternalServerError, match="request_timeout_s=0.3") as e:
            ask(client(url), questions[0])
        assert e.value.status_code == 504
        deadline = time.time() + 5
        while srv.service.load["running"] and time.time() < deadline:  # ended once its call returns
            time.sleep(0.05)
        assert srv.service.load == {"running": 0, "queued": 0}


def test_a_client_that_leaves_mid_stream_ends_its_episode(checkpoint, questions):
    """The client leaves after the first call's chunk; the episode ends when its second call returns
    (on CPU the trajectory streams once a segment's calls are answered)."""
    forced = ForcedSchedule.calls_then_answer(load_tokenizer(checkpoint), "Geo-Expert", [1, 20], 40)
    srv = serve.build_server(config(checkpoint), pool=slowed(checkpoint, 0.5), forced=forced)
    with serve.running(srv) as url:
        body = {"model": "router", "stream": True, "messages": [{"role": "user", "content": questions[0]}]}
        with httpx.stream("POST", f"{url}/chat/completions", json=body) as r:
            assert next(line for line in r.iter_lines() if "trajectory" in line).startswith("data: ")
        deadline = time.time() + 5
        while srv.service.load["running"] and time.time() < deadline:
            time.sleep(0.05)
        episode = srv.service.env.episodes[0]
    assert episode.end_reason == "cancelled" and len(episode.calls) == 2 and episode.policy_tokens < 40


def failing_pool_file(tmp_path, policy) -> str:
    """The trained candidates behind an OpenAI-compatible URL where nothing listens."""
    specs = [{k: c[k] for k in ("name", "model", "params_b", "price_per_1m_output", "price_per_1m_input")}
             for c in serve.load_routing_settings(policy).candidates]
    path = tmp_path / "down.yaml"
    path.write_text(yaml.safe_dump({"candidates": specs, "backend": {
        "kind": "openai", "base_url": closed_port_url(), "timeout_s": 1.0, "max_retries": 0}}))
    return str(path)


def test_failing_candidates_degrade_answers_never_500_and_turn_health_503(tmp_path, checkpoint, questions):
    srv = serve.build_server(config(checkpoint, task=None, pool=failing_pool_file(tmp_path, checkpoint)),
                             forced=calling(checkpoint))
    with serve.running(srv) as url:
        c = client(url)
        answers = [ask(c, q) for q in questions[:24]]
        health = httpx.get(url.removesuffix("/v1") + "/health")
    calls = [call for a in answers for call in a.model_extra["routing"]["calls"]]
    assert len(calls) >= 20 and all(call["error"] and call["cost"] == 0 for call in calls)
    assert all(a.model_extra["routing"]["failed_calls"] == len(a.model_extra["routing"]["calls"]) for a in answers)
    report = health.json()
    assert health.status_code == 503 and report["status"] == "failing"
    assert report["recent_failed_call_rate"] == 1.0 and report["failed_by_kind"] == {"connection": len(calls)}
    assert report["last_error"].split(":")[0] in srv.pool.names  # led by its candidate


def test_the_candidate_cache_records_then_replays(tmp_path, checkpoint, questions):
    """A pool with `cache: readwrite` records every reply; the same pool in `replay` serves them with
    no backend, and the answers are the same."""
    specs = [{k: c[k] for k in ("name", "model", "params_b", "price_per_1m_output", "price_per_1m_input")}
             for c in serve.load_routing_settings(checkpoint).candidates]
    runs = {}
    for mode in ("readwrite", "replay"):
        path = tmp_path / f"{mode}.yaml"
        path.write_text(yaml.safe_dump({"candidates": specs, "backend": {"kind": "simulated"},
                                        "cache": {"mode": mode, "path": str(tmp_path / "cache.sqlite")}}))
        with serve.running(serve.build_server(config(checkpoint, task=None, pool=str(path)))) as url:
            runs[mode] = [a.model_extra["routing"] for a in ask_all(url, questions[:32])]
    calls = {mode: [c for r in rs for c in r["calls"]] for mode, rs in runs.items()}
    assert not all(c["cached"] for c in calls["readwrite"])  # recorded (a sub-query asked twice is a hit)
    assert all(c["cached"] and not c["error"] for c in calls["replay"])
    assert [r["trajectory"] for r in runs["replay"]] == [r["trajectory"] for r in runs["readwrite"]]


def test_a_pool_that_differs_from_the_trained_one_is_refused_at_start(tmp_path, checkpoint):
    specs = [{k: c[k] for k in ("name", "model", "params_b", "price_per_1m_output")}
             for c in serve.load_routing_settings(checkpoint).candidates]
    specs[0]["price_per_1m_output"] *= 2
    path = tmp_path / "pricier.yaml"
    path.write_text(yaml.safe_dump({"candidates": specs, "backend": {"kind": "simulated"}}))
    with pytest.raises(ValueError, match=f"differs from the one the policy was trained with: {specs[0]['name']}"):
        serve.build_server(config(checkpoint, task=None, pool=str(path)))


def test_a_graceful_shutdown_answers_the_requests_in_flight(checkpoint, questions):
    srv = serve.build_server(config(checkpoint), pool=slowed(checkpoint, 0.5), forced=calling(checkpoint))
    results = {}
    with serve.running(srv) as url:
        def one(i):
            results[i] = ask(client(url), questions[i]).choices[0].message.content
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        while srv.service.load["running"] < 8:
            time.sleep(0.01)
    # leaving `running` asked uvicorn to exit while all 8 were waiting on their calls
    for t in threads:
        t.join()
    assert sorted(results) == list(range(8)) and not srv.service.alive
    with pytest.raises(openai.APIConnectionError):
        ask(client(url), questions[0])


def test_the_fast_engine_serves_the_simple_paths_answers(checkpoint, questions):
    """On CPU the FastEngine runs eagerly; with `feed` its free slots take new questions, and the
    answers equal the simple path's."""
    srv = serve.build_server(config(checkpoint, engine="fast", max_batch=8))
    assert srv.service.engine is not None
    with serve.running(srv) as url:
        answers = ask_all(url, questions[:20])
    expected = alone(checkpoint, questions[:20])
    assert [a.model_extra["routing"]["trajectory"] for a in answers] == [e["trajectory"] for e in expected]
    assert srv.service.stats["most_running"] == 8


def test_serve_config_refuses_bad_flags():
    with pytest.raises(ValueError, match="--policy is required"):
        serve.parse_args(["--task", "routeworld"])
    with pytest.raises(ValueError, match="not both"):
        serve.parse_args(["--policy", "p", "--task", "routeworld", "--pool", "x.yaml"])
    with pytest.raises(ValueError, match="--max-concurrent=8 must be >= --max-batch=64"):
        serve.parse_args(["--policy", "p", "--task", "routeworld", "--max-concurrent", "8"])
    cfg = serve.parse_args(["--policy", "p", "--pool", "x.yaml", "--port", "9000", "--cost-weight", "0.5"])
    assert dataclasses.astuple(cfg)[:5] == ("p", "x.yaml", None, "127.0.0.1", 9000) and cfg.cost_weight == 0.5


@pytest.fixture(scope="module")
def conditioned(checkpoint, tmp_path_factory):
    """The same weights with routing settings of a policy trained across cost weights and caps."""
    policy = tmp_path_factory.mktemp("conditioned") / "policy"
    shutil.copytree(checkpoint, policy)
    (policy.parent / "config.yaml").write_text((checkpoint.parent / "config.yaml").read_text())
    settings = serve.load_routing_settings(checkpoint)
    save_routing_settings(policy, dataclasses.replace(settings, alpha={"sample": [0.0, 0.5, 0.8]},
                                                      max_cost={"low": 5.0, "high": 50.0}))
    return policy


def test_cost_weights_and_caps_of_a_conditioned_policy_are_honoured_per_request_in_one_batch(conditioned, questions):
    """Requests with different cost weights and caps share a batch; each plays the episode it would
    play alone under its own weight and cap (stated in its prompt, the cap enforced by the env)."""
    asks = [(q, w, cap) for q in questions[:12] for w, cap in ((None, None), (0.5, None), (0.8, 5.0))]
    srv = serve.build_server(config(conditioned))
    with serve.running(srv) as url:
        async def gather():
            c = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
            return await asyncio.gather(*[c.chat.completions.create(
                model="router", messages=[{"role": "user", "content": q}],
                extra_body={k: v for k, v in (("cost_weight", w), ("max_cost", cap)) if v is not None})
                for q, w, cap in asks])
        answers = asyncio.run(gather())
        warned = ask(client(url), questions[0], extra_body={"cost_weight": 0.3}).model_extra["routing"]
        with pytest.raises(openai.BadRequestError, match=r"'cost_weight': alpha=1.5 must lie in \[0, 1\]"):
            ask(client(url), questions[0], extra_body={"cost_weight": 1.5})
        with pytest.raises(openai.BadRequestError, match="'max_cost': max_cost=-2 must be > 0"):
            ask(client(url), questions[0], extra_body={"max_cost": -2})
    assert srv.service.stats["most_running"] >= 18
    routing = [a.model_extra["routing"] for a in answers]
    # no weight: the lowest trained one; no cap under sampled caps: the highest trained one
    assert [(r["cost_weight"], r["max_cost"]) for r in routing[:3]] == [(0.0, 50.0), (0.5, 50.0), (0.8, 5.0)]
    assert all(r["total_cost"] <= r["max_cost"] for r in routing)
    prompts = {(w, cap): a.usage.prompt_tokens for a, (_, w, cap) in zip(answers, asks)}
    assert len(set(prompts.values())) == 3  # each weight and cap is stated in its prompt
    assert warned["cost_weight"] == 0.3 and "outside the trained alpha" in warned["warnings"][0]
    expected = alone(conditioned, [q for q, _, _ in asks],
                     [{"alpha": r["cost_weight"], "max_cost": r["max_cost"]} for r in routing])
    assert [r["trajectory"] for r in routing] == [e["trajectory"] for e in expected]


def test_a_policy_trained_with_and_without_a_cap_answers_uncapped_by_default(checkpoint, questions, tmp_path):
    """`.inf` among the trained caps: a request without max_cost states no budget and shows `null`, one
    with a cap states it; strict JSON never sees infinity."""
    policy = tmp_path / "policy"
    shutil.copytree(checkpoint, policy)
    (tmp_path / "config.yaml").write_text((checkpoint.parent / "config.yaml").read_text())
    save_routing_settings(policy, dataclasses.replace(serve.load_routing_settings(checkpoint),
                                                      max_cost={"sample": [float("inf"), 40.0]}))
    with serve.running(serve.build_server(config(policy))) as url:
        models = httpx.get(url + "/models").json()
        free, capped = ask(client(url), questions[0]), ask(client(url), questions[0], extra_body={"max_cost": 40})
    assert models["data"][0]["routing"]["max_cost"] == {"sample": [None, 40.0]}
    assert free.model_extra["routing"]["max_cost"] is None and capped.model_extra["routing"]["max_cost"] == 40
    assert "warnings" not in free.model_extra["routing"] and "warnings" not in capped.model_extra["routing"]
    assert capped.usage.prompt_tokens > free.usage.prompt_tokens  # "Budget: 40 micro-$." is stated
