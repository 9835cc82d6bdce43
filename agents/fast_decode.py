"""FastEngine: the rollout engine of GPU runs. It drives a `FastModel` (fused weights, a static KV
cache read in place by grouped-query attention) in decode bursts captured as one CUDA graph, detects
stop strings on the device, and refills finished episodes' slots with new questions of the phase."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from agents.fast_model import FastModel
from agents.rollout import Feed, ForcedSchedule, RolloutStats, episode_seed
from agents.sampling import choose_tokens
from envs.episode import CALLING, GENERATING, eos_token_ids, token_texts
from envs.vector import MultiRouteVectorEnv
from rewards.tags import STOP_STRINGS

log = logging.getLogger("routerl")
_NEVER = 1 << 40  # a token count no episode reaches


def token_tails(tokenizer, vocab_size: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `width` characters of every token's text as codes, right-aligned ((V, width) int32,
    0 = no character), and how many there are ((V,) long)."""
    texts = token_texts(tokenizer)[:vocab_size]
    codes = torch.zeros(vocab_size, width, dtype=torch.int32)
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    for i, text in enumerate(texts):
        tail = text[-width:]
        if tail:
            codes[i, width - len(tail):] = torch.tensor([ord(c) for c in tail], dtype=torch.int32)
            lengths[i] = len(tail)
    return codes, lengths


def extend_tails(tails: torch.Tensor, token_codes: torch.Tensor, token_lengths: torch.Tensor,
                 stops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Append each row's new token text (its right-aligned codes and length) to the row's last
    characters `tails` (B, W). Returns the new tails and whether a stop string (codes) ends inside
    the new token's characters: the device's test for `</search>` or `</answer>` however BPE split it."""
    B, W = tails.shape
    j = torch.arange(W, device=tails.device)[None]
    fresh = j >= (W - token_lengths)[:, None]  # positions now holding the new token's characters
    shifted = tails.gather(1, (token_lengths[:, None] + j).clamp(max=W - 1))
    new = torch.where(fresh, token_codes, shifted)
    hit = torch.zeros(B, dtype=torch.bool, device=tails.device)
    for stop in stops:
        L = stop.shape[0]
        match = (new.unfold(1, L, 1) == stop).all(-1)  # (B, W - L + 1): a window spells the stop string
        ends = torch.arange(L - 1, W, device=tails.device)[None]
        hit |= (match & (ends >= (W - token_lengths)[:, None])).any(-1)
    return new, hit


def forced_plan(forced: ForcedSchedule | None, tokenizer) -> tuple[dict[int, int], list[int]]:
    """The forced schedule as `run_rollouts` writes it: the id forced at each policy-token count (a
    chunk starting inside an earlier chunk's tokens is never used), and the counts at which a chunk
    whose text holds a stop string ends (the device freezes the row there at the latest, so the host
    knows in advance)."""
    ids, closing, end = {}, [], 0
    for start in sorted(forced.chunks if forced else {}):
        chunk = list(forced.chunks[start])
        if start >= end and chunk:
            ids.update(zip(range(start, start + len(chunk)), chunk))
            end = start + len(chunk)
            if any(stop in tokenizer.decode(chunk, skip_special_tokens=False) for stop in STOP_STRINGS):
                closing.append(end)
    return ids, closing


def advance_rows(nxt: torch.Tensor, active: torch.Tensor, tails: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor,
                 count: torch.Tensor, stop_at: torch.Tensor, eos: torch.Tensor, token_codes: torch.Tensor,
                 token_lengths: torch.Tensor, stops: list[torch.Tensor]) -> None:
    """Advance the active rows by their chosen tokens `nxt`, in place: their text tails, last token,
    position and count; then freeze the rows whose text ended a stop string, that chose an EOS id or
    that reached their stop count."""
    new_tails, stopped = extend_tails(tails, token_codes[nxt], token_lengths[nxt], stops)
    tails.copy_(torch.where(active[:, None], new_tails, tails))
    tok.copy_(torch.where(active, nxt, tok))
    pos.add_(active.long())
    count.add_(active.long())
    active.copy_(active & ~stopped & ~eos[nxt] & (count < stop_at))


@dataclass
class Slot:
    """Host view of one cache row: its episode, its last token (not yet in the cache) and that
    token's position, and whether its text starts anew (a prompt, or a reply just inserted) at the
    next upload."""

    episode: int | None = None
    token: int = 0
    pos: int = 0
    restart: bool = False


class FastEngine:
    """Runs rollout phases with `FastModel`: `slots` episodes decode together; a slot whose episode
    ends takes the next waiting one. The device decodes `burst` tokens per call (one CUDA graph
    replay on GPU, eager on CPU) and freezes a row as soon as its text ends a stop string
    (`</search>`, `</answer>`: `extend_tails` on the device), it samples an EOS id or it reaches
    its stop count, so Python sees every token once, in batches, and acts only at stops. The next
    burst starts before Python reads the last one's tokens, so the env's work overlaps decoding.

    Use `run(...)` directly or `run_rollouts(..., engine=engine)`: same arguments, same results
    as the simple path (token for token with greedy decoding)."""

    def __init__(self, model, tokenizer, slots: int, max_len: int, burst: int = 8, bucket: int = 256,
                 prefill_tokens: int = 16384, use_graphs: bool | None = None, compile: bool = True,
                 extra_eos_ids=(), attention: str = "auto", autotune: bool = False, call_window_s: float = 0.05):
        # cache positions rounded up to the bucket: every attention length read is a multiple of it
        # (an unaligned length such as 785 makes the attention matmuls twice as slow); a row may run
        # two bursts past the host's last look at it
        self.net = FastModel(model, slots, _round_up(max_len + 2 * burst + 1, bucket), attention)
        self.max_len, self.burst, self.bucket, self.prefill_tokens = max_len, burst, bucket, prefill_tokens
        self.call_window_s = call_window_s
        self.tokenizer = tokenizer
        dev = self.net.device
        self.use_graphs = (dev.type == "cuda") if use_graphs is None else use_graphs
        self.choose, self.advance = choose_tokens, advance_rows
        if self.use_graphs and compile:
            self.net.compile(autotune)
            self.choose = torch.compile(choose_tokens, dynamic=False)  # the vocabulary-wide work, fused
            self.advance = torch.compile(advance_rows, dynamic=False)  # a few dozen small kernels, fused
        vocab = self.net.lm_head.shape[0]
        self.eos = torch.zeros(vocab, dtype=torch.bool)
        self.eos[list(eos_token_ids(tokenizer, extra_eos_ids))] = True
        self.eos = self.eos.to(dev)
        # the device's view of each row's text: its last characters, for stop strings split over tokens
        width = 2 * max(len(t) for t in STOP_STRINGS)
        self.token_codes, self.token_lengths = (t.to(dev) for t in token_tails(tokenizer, vocab, width))
        self.stops = [torch.tensor([ord(c) for c in t], dtype=torch.int32, device=dev) for t in STOP_STRINGS]
        B = slots
        z = lambda dtype=torch.long: torch.zeros(B, dtype=dtype, device=dev)
        self.tok, self.pos, self.count, self.stop_at, self.key = z(), z(), z(), z(), z()
        self.active = z(torch.bool)
        self.tails = torch.zeros(B, width, dtype=torch.int32, device=dev)
        # the phase's forced id at each policy-token count (-1: sampled), for every row; a count never
        # exceeds a position, so the table covers every count a row can reach
        self.forced_ids = torch.full((self.net.scratch + 1,), -1, dtype=torch.long, device=dev)
        self.closing: list[int] = []  # counts at which a forced chunk freezes its row (`forced_plan`)
        self.row_stops = [0] * B  # each row's stop count, as last uploaded
        self.epoch = [0] * B  # uploads per row: a burst's tokens count only for the upload they ran under
        self.out_tok = torch.zeros(B, burst, dtype=torch.long, device=dev)
        self.out_lp = torch.zeros(B, burst, dtype=torch.float, device=dev)
        self.out_valid = torch.zeros(B, burst, dtype=torch.bool, device=dev)
        # two pinned host copies of a burst's outputs: one in flight while the host reads the other
        outputs = (self.out_tok, self.out_lp, self.out_valid, self.active)
        self.host_out = [[torch.empty(t.shape, dtype=t.dtype, pin_memory=self.use_graphs) for t in outputs]
                         for _ in range(2)]
        self.launches = 0
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.prefill_graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]] = {}
        self.pool = None
        # wall time of each part of `run` (prefill: settling slots, calls and prefill included; calls:
        # making the calls and inserting the replies, within prefill; upload: host state to the device
        # and launching a burst; decode: waiting for a burst's tokens; env: pushing them; capture:
        # graphs of new shapes, inside prefill or upload), the decode steps run, plain and times their
        # cache length, the decode steps run while calls were out, the bursts in which no row decoded, the
        # graphs captured, and the episodes ended for lack of cache room (`_out_of_room`)
        self.timings = dict.fromkeys(("prefill_s", "calls_s", "upload_s", "decode_s", "env_s", "capture_s",
                                      "decode_steps", "decode_kv_steps", "steps_during_calls", "idle_bursts",
                                      "captures", "out_of_room"), 0.0)

    def load_weights(self, model) -> None:
        """Refresh the engine's weights from `model` (the same architecture), e.g. after an update."""
        self.net.load_weights(model)

    # -- device side

    def _step(self, j: int, kv_len: int, temperature: float, top_p: float) -> None:
        """One decode step for every row: write `tok` at `pos`, choose the next token, advance the
        active rows, and freeze rows whose text ended a stop string, that chose an EOS id or that
        reached their stop count."""
        hidden = self.net.forward(self.tok[:, None], self.pos[:, None], None, kv_len)
        logits = self.net.logits(hidden[:, 0])
        nxt, lp = self.choose(logits, temperature, top_p, self.key, self.count, self.forced_ids)
        self.out_tok[:, j] = nxt
        self.out_lp[:, j] = lp
        self.out_valid[:, j] = self.active
        self.advance(nxt, self.active, self.tails, self.tok, self.pos, self.count, self.stop_at, self.eos,
                     self.token_codes, self.token_lengths, self.stops)

    def _burst(self, kv_len: int, temperature: float, top_p: float) -> None:
        for j in range(self.burst):
            self._step(j, kv_len, temperature, top_p)

    def _decode(self, kv_len: int, temperature: float, top_p: float) -> None:
        """Decode `burst` tokens for every active row: one graph replay on GPU."""
        if not self.use_graphs:
            return self._burst(kv_len, temperature, top_p)
        key = (kv_len, temperature, top_p)
        if key not in self.graphs:
            state = (self.tok, self.pos, self.count, self.active, self.tails)  # what a burst advances
            saved = [t.clone() for t in state]

            def restore() -> None:
                for t, s in zip(state, saved):
                    t.copy_(s)

            def drop_compiled() -> bool:
                if self.net.compiled_layer is None and self.choose is choose_tokens and not self.net.fused_attention:
                    return False
                self.net.compiled_layer, self.net.compiled_final = None, None
                self.net.fused_attention = False
                self.choose, self.advance = choose_tokens, advance_rows
                restore()
                return True
            self.graphs[key] = self._capture(lambda: self._burst(kv_len, temperature, top_p),
                                             drop_compiled, "decode step")
            restore()  # the warm-up advanced the rows; the replay below does it for real
        self.graphs[key].replay()

    @torch.no_grad()  # compiled for inference whoever calls first (compiled code guards on grad mode)
    def _capture(self, work, drop_compiled, what: str) -> torch.cuda.CUDAGraph:
        """`work` captured as a CUDA graph in the engine's shared memory pool, after one warm-up run
        (which compiles) on a side stream. If compiling fails (inductor, or the Triton attention kernel),
        `drop_compiled` falls back to eager PyTorch (True if it had compiled code to drop) and the
        warm-up runs again: a compiler failure costs speed, never the run. Counted in `timings` (a shape
        seen for the first time)."""
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            try:
                work()
            except Exception as e:
                if not drop_compiled():
                    raise
                log.warning("compiling the %s failed (%s); running it in eager PyTorch in CUDA graphs", what,
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
                work()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            work()
        self.pool = graph.pool()
        self.timings["captures"] += 1
        self.timings["capture_s"] += time.perf_counter() - t0
        return graph

    def cache_len(self, top: int) -> int:
        """The attention length for positions below `top`: rounded up to the bucket (one graph per
        bucket; the cache itself is a whole number of buckets)."""
        return min(self.net.scratch, _round_up(top, self.bucket))

    # -- host side

    def _upload(self, rows: list[int], slots: list[Slot], env: MultiRouteVectorEnv, keys: list[int]) -> None:
        """Write the host's view of the given rows into the device buffers, in stream order (no wait
        for a burst in flight). The other rows keep the state their bursts advanced; a row whose
        text starts anew gets empty tails (the env's tag scanner starts anew there too)."""
        limit = env.cfg.max_response_tokens
        values = []
        restart = [r for r in rows if slots[r].restart]
        for r in rows:
            s = slots[r]
            s.restart = False
            ep = env.episodes[s.episode] if s.episode is not None else None
            running = ep is not None and ep.state == GENERATING
            count = ep.policy_tokens if ep is not None else 0
            self.row_stops[r] = min(limit, _next_closing(self.closing, count))
            values.append([s.token, s.pos if ep is not None else self.net.scratch - self.burst, count, running,
                           self.row_stops[r], keys[s.episode] if ep is not None else 0])
            self.epoch[r] += 1
        idx = _to_device(torch.tensor(rows), self.net.device)
        columns = _to_device(torch.tensor(values, dtype=torch.long), self.net.device)
        for k, name in enumerate(("tok", "pos", "count", "active", "stop_at", "key")):
            buf = getattr(self, name)
            buf[idx] = columns[:, k].to(buf.dtype)
        if restart:
            self.tails[_to_device(torch.tensor(restart), self.net.device)] = 0

    def _out_of_room(self, episode, needed: int) -> None:
        """End an episode whose reply or decoding needs more cache positions than the engine has
        (reason "context"): a too-small `max_len` costs that episode, never the run."""
        if not self.timings["out_of_room"]:
            log.warning("an episode needs %d cache positions, past the engine's max_len=%d: ended there (raise "
                        "rollout.engine_max_len)", needed, self.max_len)
        self.timings["out_of_room"] += 1
        episode.truncate("context")

    def _launch(self, kv_len: int, temperature: float, top_p: float) -> Burst:
        """Start a burst of `burst` steps for every row and the copy of its tokens to the host; returns
        without waiting for either."""
        self._decode(kv_len, temperature, top_p)
        self.timings["decode_steps"] += self.burst
        self.timings["decode_kv_steps"] += self.burst * kv_len
        out = (self.out_tok, self.out_lp, self.out_valid, self.active)
        if not self.use_graphs:
            return Burst([t.clone() for t in out], None, list(self.epoch))
        self.launches += 1
        host = self.host_out[self.launches % 2]  # the burst read last used the other set
        for h, t in zip(host, out):
            h.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Burst(host, done, list(self.epoch))

    def _append(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, kv_len: int,
                from_start: bool) -> None:
        """Write the K/V of ids (n, w) at positions into cache rows `rows` (`from_start`: every row
        starts at position 0). On GPU one CUDA graph per (n, w, kv_len, from_start) bucket: an eager
        prefill spends most of its time launching kernels when it appends a few dozen reply tokens."""
        if not self.use_graphs:
            self.net.forward(ids, positions, rows, kv_len, from_start)
            return
        key = (*ids.shape, kv_len, from_start)
        if key not in self.prefill_graphs:
            inputs = [t.clone() for t in (ids, positions, rows)]

            def drop_compiled() -> bool:
                had = self.net.compiled_prefill is not None
                self.net.compiled_prefill = self.net.compiled_final = None
                return had
            # the warm-up writes the same K/V the replay writes
            work = lambda: self.net.forward(inputs[0], inputs[1], inputs[2], kv_len, from_start)
            self.prefill_graphs[key] = (self._capture(work, drop_compiled, "prefill"), inputs)
        graph, inputs = self.prefill_graphs[key]
        for dst, src in zip(inputs, (ids, positions, rows)):
            dst.copy_(src)
        graph.replay()

    def _prefill(self, jobs: list[tuple[int, Slot, list[int], int]]) -> None:
        """Append ids into the cache rows of the given slots (prompts, or a last token plus the env's
        `<info>` ids) but the last, which becomes the slot's token: the next burst decodes it and
        chooses what follows, so the host waits for nothing here. jobs: (row, slot, ids, start
        position). Groups are padded to a power-of-two row count and a width of `_bucket_width` and
        their cache length rounded up to `bucket`, so few shapes recur (each is one CUDA graph):
        padding rows repeat the group's first row, and every padding token sits at the scratch
        position."""
        for row, s, seq, start in jobs:
            s.token, s.pos, s.restart = seq[-1], start + len(seq) - 1, True
        jobs = [(row, seq[:-1], start) for row, _, seq, start in jobs if len(seq) > 1]
        dev = self.net.device
        rows_for = lambda n: min(max(_pow2_at_least(n), 2), self.net.slots)  # one row would get a graph of its own
        i = 0
        while i < len(jobs):  # groups of at most `prefill_tokens` padded tokens
            group, longest = [jobs[i]], len(jobs[i][1])
            i += 1
            while i < len(jobs) and (rows_for(len(group) + 1) * _bucket_width(max(longest, len(jobs[i][1])))
                                     <= self.prefill_tokens):
                longest = max(longest, len(jobs[i][1]))
                group.append(jobs[i])
                i += 1
            n, width = rows_for(len(group)), _bucket_width(longest)
            lengths = np.zeros(n, dtype=np.int64)
            lengths[:len(group)] = [len(seq) for _, seq, _ in group]
            starts = np.zeros(n, dtype=np.int64)
            starts[:len(group)] = [start for _, _, start in group]
            filled = np.arange(width)[None] < lengths[:, None]  # (n, width), row-major like the ids below
            ids = np.zeros((n, width), dtype=np.int64)
            ids[filled] = np.fromiter(itertools.chain.from_iterable(seq for _, seq, _ in group), np.int64)
            positions = np.where(filled, starts[:, None] + np.arange(width)[None], self.net.scratch)
            rows = np.array([j[0] for j in group] + [group[0][0]] * (n - len(group)), dtype=np.int64)
            kv_len = self.cache_len(int((starts + lengths).max()))
            self._append(*(_to_device(torch.from_numpy(a), dev) for a in (ids, positions, rows)), kv_len,
                         from_start=not starts.any())

    @torch.no_grad()
    def run(self, env: MultiRouteVectorEnv, examples: list, temperature: float, top_p: float, seed: int,
            step: int, pad_id: int, index_offset: int = 0, forced: ForcedSchedule | None = None,
            feed: Feed | None = None) -> tuple[list[list[float]], RolloutStats]:
        """Play one rollout phase (see `run_rollouts`); returns the sampler's log-prob of every policy
        token, per episode. `pad_id` is unused: the cache is never padded. Episodes that `feed` starts
        wait for a free slot like the phase's own."""
        env.reset(examples)
        self.eos[sorted(env.eos_ids)] = True  # the env's own end-of-sequence ids stop a burst too
        self.timings = dict.fromkeys(self.timings, 0.0)
        keys: list[int] = []
        ids, self.closing = forced_plan(forced, self.tokenizer)
        table = torch.full(self.forced_ids.shape, -1, dtype=torch.long)
        at = [c for c in ids if c < len(table)]
        table[at] = torch.tensor([ids[c] for c in at], dtype=torch.long)
        self.forced_ids.copy_(table)  # in place: captured graphs read it at this address
        logps: list[list[float]] = []
        stats = RolloutStats()
        waiting: deque[int] = deque()
        slots = [Slot() for _ in range(self.net.slots)]

        def admit() -> None:
            """Queue the episodes started since the last look (the phase's, then those `feed` added)."""
            for i in range(len(keys), len(env.episodes)):
                keys.append(episode_seed(seed, step, index_offset + i))
                logps.append([])
                waiting.append(i)

        def accept(s: Slot, tokens: list[int], lps: list[float]) -> int:
            """Push chosen tokens of slot s's episode up to the env's stop; returns how many it took."""
            n = env.push_many(s.episode, tokens)
            logps[s.episode].extend(lps[:n])
            stats.generated_tokens += n
            return n

        # A pipeline of one burst: the next burst starts before the host reads the last one's tokens, so
        # the env's work overlaps the device's. A row the device froze (a stop string, EOS, its stop
        # count) sits out the burst in flight; the host then settles it and uploads it alone.
        inflight: Burst | None = None
        wake = set(range(len(slots)))  # rows to upload even if unchanged: all at first (state left by others)
        while True:
            t0 = time.perf_counter()
            if feed is not None:
                feed(env)
            admit()
            rows = self._settle(slots, env, waiting, stats) | wake
            wake = set()
            t1 = time.perf_counter()
            if rows:
                self._upload(sorted(rows), slots, env, keys)
            running = [r for r, s in enumerate(slots)
                       if s.episode is not None and env.episodes[s.episode].state == GENERATING]
            launched = None
            if running and (inflight is None or self._may_decode(running, rows, slots, env)):
                # a row may be one unread burst ahead of the host's view: room for two
                launched = self._launch(self.cache_len(max(slots[r].pos for r in running) + 2 * self.burst + 1),
                                        temperature, top_p)
                self.timings["steps_during_calls"] += self.burst if env.calls_out else 0
            t2 = time.perf_counter()
            self.timings["prefill_s"] += t1 - t0
            self.timings["upload_s"] += t2 - t1
            if inflight is not None:
                wake = self._read(inflight, slots, env, accept)
            if launched is None and inflight is None:
                break
            inflight = launched
        return logps, stats

    def _may_decode(self, running: list[int], uploaded: set[int], slots: list[Slot], env) -> bool:
        """Whether a burst launched now, behind the one in flight, can decode a token: some running
        row stays below its stop count after the burst in flight (a row uploaded just now starts from
        the host's count; another may run that burst whole). A burst in which every row is frozen
        (e.g. all at a call) would only delay the host's next look."""
        lag = lambda r: 0 if r in uploaded else self.burst
        return any(env.episodes[slots[r].episode].policy_tokens + lag(r) < self.row_stops[r] for r in running)

    def _settle(self, slots: list[Slot], env, waiting: deque, stats: RolloutStats) -> set[int]:
        """Until every slot generates, waits for a reply or is empty: refill the slots whose episode
        ended, start the calls of the calling episodes (concurrently, in the background), take the
        replies that have arrived, and prefill prompts or replies. The other rows decode while calls
        are out; only when no row can, it waits: up to `call_window_s` for every reply (so calls made
        together come back together), then for the first. Returns the rows whose device state the host
        changed."""
        changed = set()
        while True:
            jobs = []
            for row, s in enumerate(slots):
                ep = env.episodes[s.episode] if s.episode is not None else None
                if ep is None or ep.done:
                    if s.episode is not None:
                        changed.add(row)
                    s.episode = waiting.popleft() if waiting else None
                    if s.episode is not None:
                        jobs.append((row, s, list(env.episodes[s.episode].prompt_ids), 0))
            calling = [row for row, s in enumerate(slots)
                       if s.episode is not None and env.episodes[s.episode].state == CALLING]
            if calling:
                t0 = time.perf_counter()
                env.submit()
                idle = not jobs and not any(s.episode is not None and env.episodes[s.episode].state == GENERATING
                                            for s in slots)
                inserted = env.collect(self.call_window_s if idle else 0.0, block=idle)
                self.timings["calls_s"] += time.perf_counter() - t0
                for row in calling:
                    s = slots[row]
                    if s.episode in inserted:
                        jobs.append((row, s, [s.token] + inserted[s.episode], s.pos))
            if not jobs:
                return changed
            for job in [j for j in jobs if j[3] + len(j[2]) > self.max_len]:  # the slot is refilled next round
                if job[3] == 0:  # a prompt: nothing to train on, a setting to fix
                    raise ValueError(f"a prompt of {len(job[2])} tokens does not fit the engine's max_len="
                                     f"{self.max_len} (raise rollout.engine_max_len)")
                self._out_of_room(env.episodes[job[1].episode], job[3] + len(job[2]))
                jobs.remove(job)
                changed.add(job[0])
            if not jobs:
                continue
            stats.segments += 1
            self._prefill(jobs)
            changed.update(j[0] for j in jobs)

    def _read(self, burst: Burst, slots: list[Slot], env, accept) -> set[int]:
        """Push a finished burst's tokens into the env, row by row, up to the device's or the env's
        stop; tokens of a row uploaded since the burst started are stale. Returns the rows the
        device froze while their episode still generates (e.g. at a forced window)."""
        t0 = time.perf_counter()
        if burst.done is not None:
            burst.done.synchronize()
        tok, lp, valid, active = (t.tolist() for t in burst.host)
        t1 = time.perf_counter()
        self.timings["idle_bursts"] += not any(map(any, valid))
        wake = set()
        for row, s in enumerate(slots):
            if s.episode is None or self.epoch[row] != burst.epoch[row]:
                continue
            ep = env.episodes[s.episode]
            decoded = valid[row].index(False) if False in valid[row] else self.burst  # the row froze there
            if decoded and ep.state == GENERATING:
                # a row the env stops first decodes on until its upload, into cache it overwrites
                n = accept(s, tok[row][:decoded], lp[row][:decoded])
                s.token, s.pos = tok[row][n - 1], s.pos + n
            if ep.state == GENERATING and s.pos >= self.max_len:
                self._out_of_room(ep, s.pos + 1)
            if ep.state == GENERATING and not active[row]:
                wake.add(row)
        self.timings["decode_s"] += t1 - t0
        self.timings["env_s"] += time.perf_counter() - t1
        return wake


@dataclass
class Burst:
    """A burst in flight: host copies of its tokens, log-probs, valid flags and the rows still active
    after it (pinned, filled when `done` fires), and each row's upload count when it started."""

    host: list[torch.Tensor]
    done: torch.cuda.Event | None
    epoch: list[int]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the work queued there (pinned, then an
    asynchronous copy in stream order)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bucket_width(n: int) -> int:
    """n rounded up to a multiple of 1/16 of its power of two (at least 16): at most 6.25% padding
    above 256 tokens, sixteen shapes per octave (a prefill graph is cheap to capture)."""
    return _round_up(n, max(16, _pow2_at_least(n) // 16))


def _next_closing(closing: list[int], count: int) -> int:
    """The first count after `count` at which a forced chunk freezes the row (`_NEVER` if none)."""
    return next((end for end in closing if end > count), _NEVER)
