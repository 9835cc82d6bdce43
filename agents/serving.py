"""A trained router as a service: questions that arrive at any time join one running rollout phase
(the simple path's next segment on CPU, a free FastEngine slot on GPU), and each is answered as soon
as its own episode ends, with its trajectory streamed as it grows. serve.py puts HTTP in front."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from agents.rollout import ForcedSchedule, episode_room, run_rollouts
from envs.candidates.pool import CandidatePool
from envs.episode import GENERATING, Episode, EpisodeConfig, make_episodes
from envs.vector import MultiRouteVectorEnv
from rewards import extract_answer, format_errors

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The service holds as many questions as it may (running or queued); the message names the limit."""


class TooLong(ValueError):
    """A question whose episode cannot fit the policy's context; the message names the limits."""


@dataclass
class Job:
    """One question in the service. `emit` receives its events on the service's thread:
    {"type": "trajectory", "text": new text} (only when `stream`), then {"type": "done", "result":
    `episode_result(...)`} or {"type": "error", "message": ...}."""

    question: str
    emit: Callable[[dict], None]
    stream: bool = False
    conditions: dict | None = None  # {"alpha": ..., "max_cost": ...} of this episode; None: the service's config
    cancelled: bool = False  # set by the caller (timeout, client gone): a generating episode ends there
    sent: int = 0  # characters of the trajectory emitted so far


def episode_result(e: Episode) -> dict:
    """What a finished episode answers: the final answer (None when the trajectory is malformed, as
    evaluate.py scores it), why not, the trajectory, the call ledger, the costs, the end reason and
    the token counts (the policy's own tokens, and those the env inserted)."""
    errors = format_errors(e.text, e.candidate_names)
    return {
        "answer": None if errors else extract_answer(e.text), "format_errors": errors,
        "trajectory": e.text, "calls": [c.as_dict() for c in e.calls],
        "raw_cost": e.raw_cost, "full_cost": sum(c.full_cost for c in e.calls),
        "end_reason": e.end_reason, "turns": e.turns, "prompt_tokens": len(e.prompt_ids),
        "policy_tokens": e.policy_tokens, "inserted_tokens": len(e.response_ids) - e.policy_tokens,
    }


class RouterService:
    """Runs a policy's greedy episodes for questions submitted from any thread, in batches.

    One thread plays rollout phases through `run_rollouts` (with `engine`, a FastEngine, on GPU).
    Before every segment or decode burst its `feed` reports the episodes that grew or ended and
    starts queued questions, up to `max_running` episodes at once; a phase ends when none runs, and
    the next starts `batch_window_s` after a question arrives, so questions sent together start
    together. At most `max_concurrent` questions are running or queued (`Overloaded` beyond).
    """

    def __init__(self, model, tokenizer, pool: CandidatePool, cfg: EpisodeConfig, max_len: int,
                 max_running: int = 64, max_concurrent: int = 256, engine=None,
                 forced: ForcedSchedule | None = None, batch_window_s: float = 0.002, phase_limit: int = 4096):
        if max_running < 1 or max_concurrent < max_running:
            raise ValueError(f"max_running={max_running} must be >= 1 and max_concurrent={max_concurrent} >= it")
        self.model, self.tokenizer, self.pool, self.cfg = model, tokenizer, pool, cfg
        self.max_len, self.max_running, self.max_concurrent = max_len, max_running, max_concurrent
        self.engine, self.forced = engine, forced
        self.batch_window_s, self.phase_limit = batch_window_s, phase_limit
        self.env = MultiRouteVectorEnv(tokenizer, pool, cfg)
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: dict[int, Job] = {}  # by episode index in the phase
        self._admitted = 0  # episodes started in this phase (a phase is ended after `phase_limit`)
        self._closing = False
        self.stats = {"phases": 0, "episodes": 0, "most_running": 0}
        self._thread = threading.Thread(target=self._serve, name="router-service", daemon=True)
        self._thread.start()

    # -- any thread

    def check_fits(self, question: str, conditions: dict | None = None) -> int:
        """The prompt's token count; `TooLong` when the prompt plus the episode's room (`episode_room`)
        passes `max_len`, naming both."""
        cfg = self.cfg
        n = len(make_episodes([{"question": question, "golden_answers": [""], **(conditions or {})}],
                              self.tokenizer, self.pool, cfg, self.env.eos_ids)[0].prompt_ids)
        if n + episode_room(cfg) > self.max_len:
            raise TooLong(f"the question's prompt has {n} tokens; with room for the episode ({episode_room(cfg)}: "
                          f"max_response_tokens={cfg.max_response_tokens}, max_turns={cfg.max_turns} replies of "
                          f"max_info_tokens={cfg.max_info_tokens}) it passes the policy's context of "
                          f"{self.max_len} tokens")
        return n

    def submit(self, job: Job) -> None:
        """Queue a question; `Overloaded` when `max_concurrent` are running or queued, or when closing."""
        with self._cond:
            if self._closing:
                raise Overloaded("the server is shutting down")
            held = len(self._queue) + len(self._running)
            if held >= self.max_concurrent:
                raise Overloaded(f"{held} questions are running or queued, the limit "
                                 f"max_concurrent={self.max_concurrent}")
            self._queue.append(job)
            self._cond.notify()

    @property
    def load(self) -> dict:
        with self._cond:
            return {"running": len(self._running), "queued": len(self._queue)}

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float | None = None) -> None:
        """Refuse new questions, finish every one submitted, then stop the thread (graceful)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout_s)

    # -- the service's thread

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
            time.sleep(self.batch_window_s)
            self._admitted = 0
            try:
                run_rollouts(self.model, self.env, [], 0.0, 1.0, 0, self.stats["phases"], self.tokenizer.pad_token_id,
                             forced=self.forced, engine=self.engine, feed=self._feed)
                self._report(self.env)
            except Exception as e:  # a bug or a device error: the phase's questions get it, the next phase runs
                log.exception("a rollout phase failed")
                with self._cond:
                    jobs, self._running = list(self._running.values()), {}
                for job in jobs:
                    job.emit({"type": "error", "message": f"the rollout failed: {type(e).__name__}: {e}"})
            self.stats["phases"] += 1

    def _feed(self, env: MultiRouteVectorEnv) -> None:
        """The engines' hook (`agents.rollout.Feed`): report the running episodes, then start queued
        questions while fewer than `max_running` episodes run."""
        self._report(env)
        with self._cond:
            room = self.max_running - len(self._running) if self._admitted < self.phase_limit else 0
            jobs = []
            while self._queue and len(jobs) < room:
                job = self._queue.popleft()
                if not job.cancelled:  # its caller gave up while it was queued
                    jobs.append(job)
            examples = [{"question": job.question, "golden_answers": [""], **(job.conditions or {})} for job in jobs]
            self._running.update(zip(env.add(examples), jobs))  # no golden answer: the service scores nothing
            self._admitted += len(jobs)
            self.stats["episodes"] += len(jobs)
            self.stats["most_running"] = max(self.stats["most_running"], len(self._running))

    def _report(self, env: MultiRouteVectorEnv) -> None:
        """Stream what each running episode wrote since the last look; answer those that ended; end
        the generating episodes whose caller gave up."""
        done = []
        for i, job in list(self._running.items()):
            e = env.episodes[i]
            if job.cancelled and e.state == GENERATING:
                e.truncate("cancelled")
            if job.stream:
                text = e.text
                if len(text) > job.sent:
                    job.emit({"type": "trajectory", "text": text[job.sent:]})
                    job.sent = len(text)
            if e.done:
                job.emit({"type": "done", "result": episode_result(e)})
                done.append(i)
        if done:
            with self._cond:
                for i in done:
                    del self._running[i]
