"""Serve a trained router behind an OpenAI-compatible endpoint:

    python serve.py --policy DIR (--pool configs/candidates/X.yaml | --task routeworld) \\
        [--host 127.0.0.1] [--port 8000] [--api-key-env VAR]

POST /v1/chat/completions answers the last user message by the policy's multi-round routing: the
answer is the assistant message, `usage` counts the policy's own tokens, and the extension field
`routing` lists every call (candidate, sub-query, reply, tokens, cost, latency, error), the total cost
in micro-dollars and the end reason. `stream: true` sends OpenAI's chunks over SSE (`delta.content`
only carries the answer; the trajectory streams in the chunks' `trajectory` field). GET /v1/models
names the router; GET /health reports the recent failed-call rate (503 while it stays at the abort
rate). Concurrent requests share one batched rollout (agents/serving.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
import warnings
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from agents import fast_model
from agents.call_errors import CallFailureConfig, RecentCallFailures
from agents.config import TaskConfig, from_dict, read_yaml
from agents.rollout import ForcedSchedule
from agents.routers import make_router
from agents.routing_settings import RoutingRangeWarning, RoutingSettings, load_routing_settings
from agents.serving import Job, Overloaded, RouterService, TooLong
from envs.candidates.pool import CandidatePool, load_pool
from envs.conditioning import cap_for_json, spec_range

log = logging.getLogger("serve")
TASKS = ("routeworld",)


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ServeConfig:
    """serve.py's settings, one command-line flag each (`--max-batch` for max_batch)."""

    policy: str = _opt(None, "a trained policy folder: train.py's checkpoints/<best|step_N>/policy "
                             "(routing.json beside the weights)")
    pool: str | None = _opt(None, "candidate pool YAML (OpenAI-compatible servers, replay, a response cache)")
    task: str | None = _opt(None, "routeworld: the task's own simulated candidates, rebuilt from the checkpoint's "
                                  "config.yaml (instead of --pool)")
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "port to listen on")
    api_key_env: str | None = _opt(None, "NAME of the environment variable holding the bearer key clients must send")
    model_name: str = _opt("router", "the model id /v1/models lists; a request naming another gets a 404")
    max_concurrent: int = _opt(256, "questions running or queued at once; more get a 429")
    max_batch: int = _opt(64, "episodes decoding together (the FastEngine's slots on a GPU)")
    max_request_bytes: int = _opt(1 << 20, "largest request body; larger get a 413")
    max_len: int = _opt(4096, "tokens an episode may fill, prompt included (at most the policy's context); a question "
                              "whose episode cannot fit gets a 413")
    request_timeout_s: float = _opt(300.0, "a request not answered by then gets a 504 and its episode is ended")
    batch_window_ms: float = _opt(2.0, "a new rollout phase waits this long for questions sent together")
    cost_weight: float | None = _opt(None, "a conditioned policy's cost weight for requests that give none "
                                           "(default: the lowest it was trained at)")
    device: str = _opt("auto", "auto (cuda when available) | cpu | cuda")
    dtype: str = _opt("float32", "the policy's weights: float32 | bfloat16")
    engine: str = _opt("auto", "auto (the FastEngine on a GPU for Qwen2/Llama) | fast | simple")
    health_window_s: float = _opt(60.0, "/health judges the candidate calls of this many seconds")

    def __post_init__(self) -> None:
        if not self.policy:
            raise ValueError("--policy is required: a trained policy folder")
        if self.pool is not None and self.task is not None:
            raise ValueError("give one of --pool (a candidate pool YAML) and --task (routeworld), not both")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"--task {self.task!r}; choose one of {list(TASKS)}")
        for key in ("port", "max_concurrent", "max_batch", "max_request_bytes", "max_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.max_concurrent < self.max_batch:
            raise ValueError(f"--max-concurrent={self.max_concurrent} must be >= --max-batch={self.max_batch}")
        if self.request_timeout_s <= 0 or self.batch_window_ms < 0 or self.health_window_s <= 0:
            raise ValueError("--request-timeout-s and --health-window-s must be > 0, --batch-window-ms >= 0")
        for key, allowed in (("device", ("auto", "cpu", "cuda")), ("dtype", ("float32", "bfloat16")),
                             ("engine", ("auto", "fast", "simple"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"--{key} {getattr(self, key)!r}; choose one of {list(allowed)}")


def parse_args(argv=None) -> ServeConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(ServeConfig):
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default, help=f.metadata["help"])
    return ServeConfig(**vars(p.parse_args(argv)))


# ---------------------------------------------------------------------------------------------------
# What the app serves

@dataclass
class Server:
    """The app's state: the batching service, the policy's routing settings, the health of the
    candidate calls, the bearer key (None: no auth) and the pool, closed at shutdown."""

    service: RouterService
    settings: RoutingSettings
    health: RecentCallFailures
    pool: CandidatePool
    cfg: ServeConfig
    api_key: str | None = None
    started: int = field(default_factory=lambda: int(time.time()))

    def close(self) -> None:
        """Finish the questions in flight, then close the candidates' clients."""
        self.service.close()
        self.pool.close()


def read_api_key(var: str | None) -> str | None:
    """The bearer key from the variable named `var` (stripped), or None without one. A variable that
    is unset, empty or holds control characters stops the server, naming the variable only."""
    if var is None:
        return None
    key = (os.environ.get(var) or "").strip()
    if not key:
        raise ValueError(f"--api-key-env {var}: the environment variable is not set or empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError(f"--api-key-env {var}: the environment variable holds control characters")
    return key


def trained_world(policy_dir: Path, task: str = "routeworld"):
    """The RouteWorld a policy was trained in, rebuilt from the training config that train.py saved
    beside `policy/`."""
    from envs.tasks import routeworld_world
    config = policy_dir.parent / "config.yaml"
    if not config.is_file():
        raise ValueError(f"--task {task} rebuilds the task from the training config, but {config} is missing; "
                         "give --pool instead")
    task_cfg = from_dict(TaskConfig, read_yaml(config).get("task") or {}, "task.")
    if task_cfg.name != task:
        raise ValueError(f"--task {task}, but the policy was trained on task {task_cfg.name!r} ({config})")
    return routeworld_world(task_cfg.world, task_cfg.world_preset)


def task_pool(policy_dir: Path, task: str) -> CandidatePool:
    """A task's own candidates (RouteWorld's simulated specialists) in the world the policy was
    trained in."""
    from envs.routeworld import routeworld_pool
    return routeworld_pool(trained_world(policy_dir, task))


def build_server(cfg: ServeConfig, pool: CandidatePool | None = None, forced: ForcedSchedule | None = None) -> Server:
    """Load the policy and its routing settings, the candidates (refused when they differ from the
    trained ones), and start the batching service. Nothing is downloaded. `pool` (candidates built in
    code) replaces --pool/--task and `forced` writes a schedule of calls into every episode (both for
    tests and benchmarks of random-weight policies)."""
    api_key = read_api_key(cfg.api_key_env)
    policy_dir = Path(cfg.policy)
    settings = load_routing_settings(policy_dir)
    if pool is None and cfg.pool is None and cfg.task is None:
        raise ValueError("give --pool (a candidate pool YAML) or --task (routeworld)")
    if pool is None:
        pool = task_pool(policy_dir, cfg.task) if cfg.task else load_pool(cfg.pool)
    try:
        settings.check_pool(pool.specs)
        if cfg.cost_weight is not None and not settings.is_conditioned:
            raise ValueError(f"--cost-weight: this policy was trained at alpha={settings.alpha} only, not across "
                             "cost weights")
        if cfg.cost_weight is not None:
            settings.check_alpha(cfg.cost_weight)
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = make_router(f"policy:{policy_dir}", None).load(device)
        model = model.to(getattr(torch, cfg.dtype))
        max_len = min(cfg.max_len, model.config.max_position_embeddings)
        engine = None
        if cfg.engine == "fast" or (cfg.engine == "auto" and device == "cuda" and fast_model.supports(model)):
            from agents.fast_decode import FastEngine
            engine = FastEngine(model, tokenizer, cfg.max_batch, max_len)
        health = RecentCallFailures(CallFailureConfig(), cfg.health_window_s)
        pool.on_record(health.observe)
        service = RouterService(model, tokenizer, pool, settings.episode_config(), max_len, cfg.max_batch,
                                cfg.max_concurrent, engine, forced, cfg.batch_window_ms / 1e3)
    except BaseException:
        pool.close()
        raise
    log.info("serving %s (%s, %s) with candidates %s on %s", policy_dir, device, "FastEngine" if engine else
             "simple path", pool.names, f"http://{cfg.host}:{cfg.port}/v1")
    return Server(service, settings, health, pool, cfg, api_key)


# ---------------------------------------------------------------------------------------------------
# Requests

class RequestError(Exception):
    """A request refused with an HTTP status and a message naming the field or limit."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 429: "rate_limit_error", 504: "timeout_error"}.get(
            self.status, "invalid_request_error")
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}},
                            self.status, headers)


@dataclass
class ChatRequest:
    question: str
    stream: bool = False
    include_usage: bool = False
    cost_weight: float | None = None
    max_cost: float | None = None


def _typed(body: dict, key: str, types: tuple, what: str) -> Any:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) and bool not in types or not isinstance(value, types)):
        raise RequestError(400, f"'{key}' must be {what}, got {json.dumps(value)[:80]}", key)
    return value


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of parts whose text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = [p.get("text") for p in content if p.get("type") == "text"]
        if all(isinstance(t, str) for t in texts):
            return "\n".join(texts)
    raise RequestError(400, f"'{where}.content' must be a string or a list of text parts", f"{where}.content")


def parse_chat(raw: bytes, model_name: str) -> ChatRequest:
    """A chat completion request read strictly: bad JSON, a wrong field type, no user message or
    n != 1 are 400s naming the field; another model is a 404. The last user message is the question;
    sampling fields (temperature, top_p, max_tokens, ...) are accepted and not used: the router
    decodes greedily under its trained limits."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = _typed(body, "model", (str,), "a string")
    if model is not None and model != model_name:
        raise RequestError(404, f"model {model!r} is not served here; this server serves {model_name!r}", "model",
                           "model_not_found")
    messages = _typed(body, "messages", (list,), "a list of messages")
    if not messages:
        raise RequestError(400, "'messages' is required: a non-empty list of {role, content}", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(400, f"'messages[{i}]' must be an object with a string 'role'", f"messages[{i}]")
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise RequestError(400, "'messages' has no message with role 'user': the last one is the question", "messages")
    question = _text(messages[users[-1]].get("content"), f"messages[{users[-1]}]")
    if not question.strip():
        raise RequestError(400, f"'messages[{users[-1]}].content' is empty", f"messages[{users[-1]}].content")
    if _typed(body, "n", (int,), "an integer") not in (None, 1):
        raise RequestError(400, "'n' must be 1: the router answers each question once", "n")
    stream = bool(_typed(body, "stream", (bool,), "true or false"))
    options = _typed(body, "stream_options", (dict,), "an object") or {}
    include_usage = _typed(options, "include_usage", (bool,), "true or false")
    for key in ("temperature", "top_p", "max_tokens", "max_completion_tokens"):
        _typed(body, key, (int, float), "a number")
    return ChatRequest(question, stream, bool(include_usage),
                       _typed(body, "cost_weight", (int, float), "a number in [0, 1]"),
                       _typed(body, "max_cost", (int, float), "a number of micro-dollars > 0"))


def episode_conditions(settings: RoutingSettings, req: ChatRequest,
                       default_weight: float | None) -> tuple[dict, list[str]]:
    """The example fields that set a request's cost weight and cap ({} for an unconditioned policy),
    and warnings for values outside what the policy was trained on. `cost_weight` needs a policy trained
    across alphas and `max_cost` one trained with a cap: otherwise a 400 naming the trained alpha."""
    alpha = settings.alpha
    if req.cost_weight is not None and not settings.is_conditioned:
        raise RequestError(400, f"'cost_weight': this policy was trained at alpha={alpha} only, not conditioned on a "
                                "cost weight; send no cost_weight (or serve a policy trained with episode.alpha "
                                "{sample: [...]} or {low, high})", "cost_weight")
    if req.max_cost is not None and settings.max_cost is None:
        raise RequestError(400, f"'max_cost': this policy was trained without a spending cap (at alpha={alpha}); "
                                "send no max_cost", "max_cost")
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if settings.is_conditioned:
                out["alpha"] = req.cost_weight if req.cost_weight is not None else (
                    default_weight if default_weight is not None else spec_range(alpha)[0])
                settings.check_alpha(out["alpha"])
            if req.max_cost is not None:
                settings.check_max_cost(req.max_cost)
                out["max_cost"] = req.max_cost
            elif isinstance(settings.max_cost, dict):  # sampled caps: the most generous trained (.inf: none)
                out["max_cost"] = spec_range(settings.max_cost)[1]
        except ValueError as e:
            key = "max_cost" if "max_cost" in str(e) else "cost_weight"
            raise RequestError(400, f"'{key}': {e}", key) from None
    notes = [str(w.message) for w in caught if issubclass(w.category, RoutingRangeWarning)]
    for note in notes:
        log.warning("a request: %s", note)
    return out, notes


# ---------------------------------------------------------------------------------------------------
# Responses

def routing_field(result: dict, conditions: dict, notes: list[str]) -> dict:
    """The `routing` extension: every call, the total cost, the end reason, the trajectory."""
    keys = ("candidate", "query", "reply", "prompt_tokens", "completion_tokens", "cost", "latency_s", "error", "cached")
    calls = [{k: c.get(k) for k in keys} for c in result["calls"]]
    return {"calls": calls, "total_cost": result["raw_cost"], "full_cost": result["full_cost"],
            "failed_calls": sum(bool(c["error"]) for c in calls), "end_reason": result["end_reason"],
            "turns": result["turns"], "format_errors": result["format_errors"], "trajectory": result["trajectory"],
            **({"cost_weight": conditions["alpha"]} if "alpha" in conditions else {}),
            **({"max_cost": cap_for_json(conditions["max_cost"])} if "max_cost" in conditions else {}),
            **({"warnings": notes} if notes else {})}


def usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["policy_tokens"],
            "total_tokens": result["prompt_tokens"] + result["policy_tokens"]}


def finish_reason(result: dict) -> str:
    return "stop" if result["end_reason"] in ("answer", "eos") else "length"


def completion(cid: str, model: str, result: dict, routing: dict) -> dict:
    message = {"role": "assistant", "content": result["answer"] or ""}
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(result), "logprobs": None}],
            "usage": usage(result), "routing": routing}


def chunk(cid: str, model: str, delta: dict | None, finish: str | None = None, **extra) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, **extra}
    return f"data: {json.dumps(body)}\n\n"


def sse_error(status: int, message: str) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'code': status}})}\n\n"


# ---------------------------------------------------------------------------------------------------
# The app

async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 naming the limit as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body has {declared} bytes, over the limit max_request_bytes={limit}")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise RequestError(413, f"the request body passes the limit max_request_bytes={limit}")
    return bytes(body)


def make_app(server: Server) -> FastAPI:
    """The FastAPI app over a started `Server`; its shutdown finishes the questions in flight."""
    cfg, service = server.cfg, server.service

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(server.close)  # uvicorn has let the requests in flight finish

    app = FastAPI(title="routerl", lifespan=lifespan)

    def check_key(request: Request) -> None:
        if server.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), server.api_key.encode()):
            raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError):
        return e.response()

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        s = server.settings
        return {"object": "list", "data": [{
            "id": cfg.model_name, "object": "model", "created": server.started, "owned_by": "routerl",
            "routing": {"candidates": [c["name"] for c in s.candidates], "alpha": s.alpha,
                        "max_cost": cap_for_json(s.max_cost), "conditioned": s.is_conditioned,
                        "max_turns": s.max_turns}}]}

    @app.get("/health")
    async def health():
        report = {**server.health.snapshot(), **service.load, "service_running": service.alive}
        ok = service.alive and not report["failing"]
        return JSONResponse({"status": "ok" if ok else "failing", **report}, 200 if ok else 503)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        req = parse_chat(await read_body(request, cfg.max_request_bytes), cfg.model_name)
        conditions, notes = episode_conditions(server.settings, req, cfg.cost_weight)
        try:
            service.check_fits(req.question, conditions)
        except TooLong as e:
            raise RequestError(413, str(e), "messages") from None
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(req.question, lambda event: loop.call_soon_threadsafe(events.put_nowait, event), req.stream,
                  conditions)
        try:
            service.submit(job)
        except Overloaded as e:
            raise RequestError(429, f"too many requests: {e}; retry later") from None
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        if req.stream:
            return StreamingResponse(stream(job, events, watcher, cid, req, conditions, notes),
                                     media_type="text/event-stream")
        try:
            event = await asyncio.wait_for(next_final(events), cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(504, f"no answer within request_timeout_s={cfg.request_timeout_s:g}") from None
        finally:
            watcher.cancel()
            job.cancelled = True  # ends the episode if it still runs (a timeout); no-op once it ended
        if event["type"] == "error":
            raise RequestError(503, event["message"])
        result = event["result"]
        return completion(cid, cfg.model_name, result, routing_field(result, conditions, notes))

    async def next_final(events: asyncio.Queue) -> dict:
        while True:
            event = await events.get()
            if event["type"] != "trajectory":
                return event

    async def cancel_on_disconnect(request: Request, job: Job) -> None:
        """End the job's episode when its client goes away (once the body is read, the server's next
        message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancelled = True

    async def stream(job: Job, events: asyncio.Queue, watcher: asyncio.Task, cid: str, req: ChatRequest,
                     conditions: dict, notes: list[str]):
        """SSE chunks: the role, the trajectory as it grows (`trajectory` beside empty deltas), the
        answer as the only content, the finish reason with `routing`, usage if asked, [DONE]."""
        model = cfg.model_name
        deadline = loop_time() + cfg.request_timeout_s
        try:
            yield chunk(cid, model, {"role": "assistant", "content": ""})
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), max(deadline - loop_time(), 0.0))
                except asyncio.TimeoutError:
                    yield sse_error(504, f"no answer within request_timeout_s={cfg.request_timeout_s:g}")
                    break
                if event["type"] == "trajectory":
                    yield chunk(cid, model, {}, trajectory=event["text"])
                    continue
                if event["type"] == "error":
                    yield sse_error(503, event["message"])
                    break
                result = event["result"]
                yield chunk(cid, model, {"content": result["answer"] or ""})
                yield chunk(cid, model, {}, finish_reason(result), routing=routing_field(result, conditions, notes))
                if req.include_usage:
                    yield chunk(cid, model, None, usage=usage(result))
                break
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            job.cancelled = True  # no-op once the episode ended

    return app


@contextmanager
def running(server: Server, host: str = "127.0.0.1", port: int = 0):
    """The app served by uvicorn in a background thread (tests, benchmarks; port 0: a free one):
    yields its base URL, e.g. http://127.0.0.1:PORT/v1. On exit uvicorn shuts down gracefully, so
    the requests in flight are answered, and the server is closed."""
    import uvicorn
    uv = uvicorn.Server(uvicorn.Config(make_app(server), host=host, port=port, log_level="warning",
                                       timeout_graceful_shutdown=int(server.cfg.request_timeout_s)))
    thread = threading.Thread(target=uv.run, name="uvicorn", daemon=True)
    thread.start()
    while not uv.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{uv.servers[0].sockets[0].getsockname()[1]}/v1"
    finally:
        uv.should_exit = True
        thread.join()


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def main(argv=None) -> None:
    import uvicorn
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    cfg = parse_args(argv)
    server = build_server(cfg)
    uvicorn.run(make_app(server), host=cfg.host, port=cfg.port, timeout_graceful_shutdown=int(cfg.request_timeout_s))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # a bad flag, policy folder, pool or key variable: one line
        sys.exit(f"serve.py: {e}")
