"""A small OpenAI-compatible chat-completions server on 127.0.0.1 that injects faults, for the tests
and `bench/chaos.py`.

The reply to a request is `answer(model, messages)`, by default `[<model>] <content of the last
message>`, and `usage` counts whitespace-separated words, so every answer is known in advance. Faults are scripted per request
in arrival order with `server.script(...)`; once the script is used up, each request draws its fault
from `mix` ({fault: probability}, the rest answered normally) with the server's seeded RNG, or is
answered normally when there is no mix. `served` counts requests by the fault applied ("ok": none).
Fault names:

    "timeout"       sleep `hang_s` before answering (set it beyond the client's timeout)
    "429"           HTTP 429 with `Retry-After: <retry_after>` (seconds)
    "500"           HTTP 500
    "400"           HTTP 400 (a client error: never worth a retry)
    "malformed"     HTTP 200 whose body is not JSON
    "no_content"    HTTP 200 JSON without `choices[0].message.content`
    "no_usage"      a normal reply without the `usage` field
    "drip"          a normal reply whose body is sent one byte every 20 ms
    "huge"          a reply of 2 MB
    "surrogate"     a reply whose JSON holds a lone surrogate ("\\udcff")
    "usage_lie"     a normal reply that reports 10**12 completion tokens
    "echo_key"      HTTP 401 echoing the Authorization header after 175 characters, plain and URL-encoded
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

FAULTS = ("timeout", "429", "500", "400", "malformed", "no_content", "no_usage", "drip", "huge", "surrogate",
          "usage_lie", "echo_key")


def reply_text(model: str, messages: list[dict]) -> str:
    """The deterministic answer of this server to `messages` sent to `model`."""
    return f"[{model}] {messages[-1]['content']}"


class FakeOpenAIServer(ThreadingHTTPServer):
    """The server and its test-visible state: the fault script, request counts, headers seen."""

    daemon_threads = True
    request_queue_size = 256  # every concurrent client connects at once (the default backlog is 5)

    def __init__(self, api_key: str | None = None, delay_s: float = 0.0, hang_s: float = 5.0,
                 retry_after: str = "1", mix: Mapping[str, float] | None = None, seed: int = 0,
                 answer: Callable[[str, list[dict]], str] = reply_text):
        super().__init__(("127.0.0.1", 0), _Handler)
        mix = dict(mix or {})
        for fault, p in mix.items():
            if fault not in FAULTS or not 0.0 <= p <= 1.0:
                raise ValueError(f"mix: {fault!r}: {p!r}; faults are {FAULTS} with probabilities in [0, 1]")
        if sum(mix.values()) > 1.0 + 1e-9:
            raise ValueError(f"mix: the probabilities sum to {sum(mix.values()):g} > 1")
        self.mix = mix
        self.answer = answer
        self.rng = random.Random(seed)
        self.served: Counter[str] = Counter()
        self.api_key = api_key
        self.delay_s = delay_s          # every answer waits this long (to observe concurrency)
        self.hang_s = hang_s
        self.retry_after = retry_after
        self.faults: deque[str | None] = deque()
        self.requests = 0               # requests received, faulty ones included
        self.in_flight = 0
        self.max_in_flight = 0
        self.authorizations: list[str | None] = []
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def script(self, *faults: str | None) -> None:
        """Apply `faults[i]` to the i-th next request (None: answer normally)."""
        for fault in faults:
            if fault is not None and fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}; known: {FAULTS}")
        with self.lock:
            self.faults.extend(faults)

    def next_fault(self) -> str | None:
        """The fault of the request arriving now (call under `lock`): the script's next, else a draw."""
        if self.faults:
            return self.faults.popleft()
        u = self.rng.random()
        for fault, p in self.mix.items():
            if u < p:
                return fault
            u -= p
        return None

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up (timeout) leaves a broken pipe; that is the test's intent


class _Handler(BaseHTTPRequestHandler):
    server: FakeOpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:
        pass

    def do_POST(self) -> None:
        srv = self.server
        with srv.lock:
            srv.requests += 1
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            fault = srv.next_fault()
            srv.served[fault or "ok"] += 1
            srv.authorizations.append(self.headers.get("Authorization"))
        try:
            self._answer(fault)
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _answer(self, fault: str | None) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with srv.lock:
            srv.bodies.append(body)
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if srv.api_key is not None and self.headers.get("Authorization") != f"Bearer {srv.api_key}":
            # like some gateways, echo what was sent: the client must scrub it from its errors
            sent = self.headers.get("Authorization")
            return self._send(401, {"error": {"message": f"invalid API key in header {sent!r}"}})
        if srv.delay_s:
            srv.stopping.wait(srv.delay_s)
        if fault == "timeout":
            srv.stopping.wait(srv.hang_s)
        if fault == "429":
            return self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": srv.retry_after})
        if fault == "500":
            return self._send(500, {"error": {"message": "internal error"}})
        if fault == "400":
            return self._send(400, {"error": {"message": "bad request"}})
        if fault == "malformed":
            return self._send_raw(200, b'{"choices": [{"message": {"content": "trunc')
        if fault == "no_content":
            return self._send(200, {"choices": [{"message": {"role": "assistant"}}]})
        if fault == "huge":
            return self._send(200, {"choices": [{"message": {"content": "x" * 2_000_000}}]})
        if fault == "surrogate":
            return self._send_raw(200, b'{"choices": [{"message": {"content": "bad \\udcff char"}}]}')
        if fault == "echo_key":
            sent = self.headers.get("Authorization") or ""
            return self._send_raw(401, ("e" * 175 + sent + " " + quote(sent, safe="")).encode())
        text = srv.answer(body["model"], body["messages"])
        reply = {"id": f"cmpl-{srv.requests}", "object": "chat.completion", "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}}]}
        if fault != "no_usage":
            prompt = sum(len(m["content"].split()) for m in body["messages"])
            completion = 10**12 if fault == "usage_lie" else len(text.split())
            reply["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": prompt + completion}
        if fault == "drip":
            return self._send_raw(200, json.dumps(reply).encode(), drip_s=0.02)
        self._send(200, reply)

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self._send_raw(status, json.dumps(payload).encode(), headers)

    def _send_raw(self, status: int, data: bytes, headers: dict | None = None, drip_s: float = 0.0) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not drip_s:
            self.wfile.write(data)
            return
        for i in range(len(data)):  # a byte at a time: each read is quick, the whole body is not
            if self.server.stopping.wait(drip_s):
                return
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()


@contextlib.contextmanager
def serve_openai(**options) -> Iterator[FakeOpenAIServer]:
    """Run a `FakeOpenAIServer(**options)` on a free loopback port for the `with` block."""
    server = FakeOpenAIServer(**options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def audited_pool(specs, base_url: str, client: Mapping, request) -> tuple:
    """A pool of `specs` over the OpenAI-compatible server at `base_url` (`client`: OpenAIBackend
    options, `request`: its RequestConfig), and the list that receives every call record it makes."""
    from envs.candidates.openai import OpenAIBackend
    from envs.candidates.pool import CandidatePool
    pool = CandidatePool(specs, OpenAIBackend(base_url, **client), request)
    records: list = []
    pool.on_record(records.append)
    return pool, records


def world_answer(world) -> Callable[[str, list[dict]], str]:
    """An `answer` that serves a RouteWorld's simulated candidates over HTTP: the candidate whose
    model id the request names answers the last message, as its in-process responder would."""
    from envs.routeworld.candidates import answer_query
    profiles = {p.model: p for p in world.config.candidates}
    return lambda model, messages: answer_query(world, profiles[model], messages[-1]["content"])


def closed_port_url() -> str:
    """A loopback URL on which nothing listens (the port was bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
