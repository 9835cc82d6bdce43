"""The `openai` backend: any OpenAI-compatible `/chat/completions` server, with retries and backoff."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
import urllib.parse
from collections.abc import Mapping, Sequence

import httpx

from envs.candidates.pool import register_backend
from envs.candidates.spec import CandidateError, CandidateSpec, Completion, Request

log = logging.getLogger(__name__)

# Statuses worth another try: request timeout, rate limit, and every server-side error.
RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))


class _Retryable(Exception):
    """One attempt failed in a way that may pass on retry; `retry_after_s` is the server's hint."""

    def __init__(self, reason: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


def candidate_error(reason: str, attempts: int) -> CandidateError:
    """A `CandidateError` carrying the number of HTTP attempts made (the pool records it)."""
    err = CandidateError(reason)
    err.attempts = attempts
    return err


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP date (RFC 9110 10.2.3).
    Returns None when the header is absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class OpenAIBackend:
    """POSTs `{base_url}/chat/completions` with the spec's model id, the request's messages and
    sampling parameters, through one `httpx.AsyncClient` created inside the running loop.

    Retry rule: timeouts, connection errors, HTTP 408/429/5xx, and 200 replies whose body is not
    JSON or lacks `choices[0].message.content` are retried up to `max_retries` times (a truncated
    body is usually a gateway under load; a server that always sends one costs only the retries).
    Other 4xx fail at once. Before retry k (1-based) the wait is the server's `Retry-After`,
    capped at `retry_after_max_s`, when it sent one, else full jitter: uniform(0, min(backoff_max_s,
    backoff_base_s * 2**(k-1))) ("Exponential Backoff and Jitter", AWS Architecture Blog, 2015).
    At most `max_concurrency` requests are in flight; waits between retries do not hold a slot.

    Each attempt has a whole-call deadline of `timeout_s` (a body sent a byte at a time gets no more),
    and reads at most `max_reply_bytes` of body (more fails the call at once).

    The API key is read from the environment variable *named* `api_key_env` when the client is
    built, stripped of surrounding whitespace, and refused if it holds control characters; it is
    never stored on this object, printed, or put in an error message (error texts are redacted of
    it, plain and URL-encoded, before they are cut).
    """

    def __init__(
        self,
        base_url: str,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_concurrency: int = 16,
        max_retries: int = 3,
        backoff_base_s: float = 0.5,
        max_reply_bytes: int = 1_000_000,
        backoff_max_s: float = 30.0,
        retry_after_max_s: float = 60.0,
        headers: Mapping[str, str] | None = None,
        seed: int | None = None,
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"openai backend: base_url must start with http:// or https://, got {base_url!r}")
        if not timeout_s > 0:
            raise ValueError(f"openai backend: timeout_s={timeout_s!r} must be > 0")
        for key, value in (("backoff_base_s", backoff_base_s),
                           ("backoff_max_s", backoff_max_s), ("retry_after_max_s", retry_after_max_s)):
            if not value >= 0:
                raise ValueError(f"openai backend: {key}={value!r} must be >= 0")
        if max_concurrency < 1:
            raise ValueError(f"openai backend: max_concurrency={max_concurrency!r} must be >= 1")
        if max_reply_bytes < 1:
            raise ValueError(f"openai backend: max_reply_bytes={max_reply_bytes!r} must be >= 1")
        if max_retries < 0:
            raise ValueError(f"openai backend: max_retries={max_retries!r} must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.max_reply_bytes = int(max_reply_bytes)
        self.max_concurrency = int(max_concurrency)
        self.max_retries = int(max_retries)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.retry_after_max_s = float(retry_after_max_s)
        self.headers = dict(headers or {})
        self.rng = random.Random(seed)
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if api_key_env and not os.environ.get(api_key_env):
            log.warning("openai backend: environment variable %s is not set; calls to %s will fail",
                        api_key_env, self.base_url)

    def __repr__(self) -> str:
        return (f"OpenAIBackend(base_url={self.base_url!r}, api_key_env={self.api_key_env!r}, "
                f"timeout_s={self.timeout_s}, max_concurrency={self.max_concurrency}, "
                f"max_retries={self.max_retries}, headers={sorted(self.headers)})")

    def _ensure_client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        """Build the client and the concurrency limit in the running loop (a client cannot move
        between loops; one built in a loop that has since changed is dropped and rebuilt)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            headers = dict(self.headers)
            if self.api_key_env:
                headers["Authorization"] = f"Bearer {self._api_key()}"
            self._client = httpx.AsyncClient(
                base_url=self.base_url, headers=headers, timeout=httpx.Timeout(self.timeout_s),
                limits=httpx.Limits(max_connections=self.max_concurrency))
            self._slots = asyncio.Semaphore(self.max_concurrency)
            self._loop = loop
        return self._client, self._slots

    def _api_key(self) -> str:
        key = (os.environ.get(self.api_key_env) or "").strip()
        if not key:
            raise candidate_error(f"environment variable {self.api_key_env} (API key for "
                                  f"{self.base_url}) is not set", attempts=0)
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
            raise candidate_error(f"environment variable {self.api_key_env} holds control characters inside "
                                  "the API key; set it again without them", attempts=0)
        return key

    def _redact(self, text: str) -> str:
        """`text` with the API key replaced by ***, as sent and in its URL-encoded forms."""
        raw = os.environ.get(self.api_key_env) if self.api_key_env else None
        keys = {raw, raw.strip()} if raw and raw.strip() else set()
        for key in list(keys):
            keys |= {urllib.parse.quote(key, safe=""), urllib.parse.quote_plus(key)}
        for key in sorted(keys, key=len, reverse=True):
            text = text.replace(key, "***")
        return text

    def backoff_s(self, attempt: int, retry_after_s: float | None) -> float:
        """The wait before retry number `attempt` (1-based); see the class docstring."""
        if retry_after_s is not None:
            return min(retry_after_s, self.retry_after_max_s)
        return self.rng.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1)))

    async def complete(self, request: Request) -> Completion:
        client, slots = self._ensure_client()
        payload = {"model": request.spec.model, "messages": request.messages, **request.sampling}
        attempts = 0
        while True:
            attempts += 1
            try:
                async with slots:
                    text, prompt_tokens, completion_tokens = await asyncio.wait_for(
                        self._attempt(client, payload), self.timeout_s)
                return Completion(text, prompt_tokens, completion_tokens, attempts=attempts)
            except (_Retryable, TimeoutError) as e:
                if isinstance(e, TimeoutError):  # the whole-call deadline
                    e = _Retryable(f"no whole reply within {self.timeout_s:g}s (timeout)")
                if attempts > self.max_retries:
                    raise candidate_error(f"{request.spec.name}: {e.reason} after {attempts} attempt(s)",
                                          attempts) from None
                await asyncio.sleep(self.backoff_s(attempts, e.retry_after_s))
            except CandidateError as e:
                raise candidate_error(f"{request.spec.name}: {e} after {attempts} attempt(s)", attempts) from None

    async def _attempt(self, client: httpx.AsyncClient, payload: dict) -> tuple[str, int | None, int | None]:
        """One HTTP round trip: the reply text and token counts, or `_Retryable` / `CandidateError`."""
        try:
            async with client.stream("POST", "/chat/completions", json=payload) as response:
                status = response.status_code
                raw = bytearray()
                async for chunk in response.aiter_bytes():
                    raw += chunk
                    if len(raw) > self.max_reply_bytes:
                        raise CandidateError(f"HTTP {status}: reply over max_reply_bytes={self.max_reply_bytes}")
                retry_after = response.headers.get("retry-after")
        except httpx.TimeoutException as e:
            raise _Retryable(f"{type(e).__name__} (timeout {self.timeout_s:g}s)") from None
        except httpx.RequestError as e:  # connection refused or reset, protocol and decoding errors
            raise _Retryable(self._redact(f"{type(e).__name__}: {e}")[:200]) from None
        if status in RETRY_STATUSES:
            raise _Retryable(f"HTTP {status}", parse_retry_after(retry_after))
        if status != 200:
            text = bytes(raw).decode("utf-8", errors="replace")
            raise CandidateError(self._redact(f"HTTP {status}: {text}")[:200])  # redacted, then cut
        try:
            body = json.loads(bytes(raw))
            text = body["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable("reply is not JSON with choices[0].message.content") from None
        if not isinstance(text, str):
            raise _Retryable(f"choices[0].message.content is {type(text).__name__}, not a string")
        text = self._redact(text)  # a server that echoes the key must not put it in the ledger or the context
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        completion_tokens = _count(usage.get("completion_tokens"))
        allowed = payload.get("max_tokens")
        if completion_tokens is not None and allowed is not None and completion_tokens > allowed:
            log.warning("%s reported %d completion tokens for max_tokens=%d; %d are charged",
                        payload["model"], completion_tokens, allowed, allowed)
            completion_tokens = allowed  # a server is never paid for more than the request allowed
        return text, _count(usage.get("prompt_tokens")), completion_tokens

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client, self._slots, self._loop = None, None, None


def _count(value) -> int | None:
    """A usage count as int, or None when the server left it out or sent something unusable."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


@register_backend("openai")
def _make_openai(specs: Sequence[CandidateSpec], **options) -> OpenAIBackend:
    return OpenAIBackend(**options)
