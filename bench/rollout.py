"""Rollout benchmark: FastEngine against transformers `generate` on random Qwen2.5-shaped models,
pure decode and multi-turn end to end, as ratios to the decode limit measured in the same run.

    python -m bench.rollout [--shapes 0.5b,1.5b,3b] [--prompt 256] [--new 256]
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import time

import numpy as np
import torch

from agents.fast_decode import FastEngine
from agents.policy import sequence_logprobs
from agents.rollout import ForcedSchedule, run_rollouts
from bench.common import (
    bpe_tokenizer,
    copy_bandwidth,
    device_busy,
    n_params,
    random_qwen,
    table,
    time_cuda,
    write_results,
)
from envs.candidates import CandidatePool, CandidateSpec
from envs.candidates.simulated import SimulatedBackend
from envs.episode import EpisodeConfig
from envs.vector import MultiRouteVectorEnv

CORPUS = ["<think> I should ask the expert. </think> <search> Expert: In which country is Korvan? </search>",
          "<info> Korvan is in Tessaly, a small country of the north. </info> <answer> Tessaly </answer>",
          "Answer the question below using the candidate models. Where is Paris? The answer is France."]
REPLY = "Korvan is a town in Tessaly; its river runs north to the sea and its people speak Tessalian."


def make_env(tok, max_new: int) -> MultiRouteVectorEnv:
    pool = CandidatePool([CandidateSpec("Expert", "expert", 7, 0.3)], SimulatedBackend({"Expert": lambda r: REPLY}))
    return MultiRouteVectorEnv(tok, pool, EpisodeConfig(max_response_tokens=max_new, prompt_template="compact",
                                                        max_info_tokens=64))


def examples_with_prompt(tok, env, n: int, prompt_len: int) -> list[dict]:
    """n questions whose prompts are about `prompt_len` tokens long."""
    words = []
    while True:
        words.append(f"w{len(words) % 97}")
        ex = {"question": "Where is Korvan? " + " ".join(words), "golden_answers": ["Tessaly"]}
        if len(env.reset([ex])[0]) >= prompt_len:
            break
    return [dict(ex, question=f"{i}: " + ex["question"]) for i in range(n)]


def gc_timer() -> list[float]:
    """A one-element list that accumulates the seconds the cyclic garbage collector runs from now on."""
    spent, start = [0.0], [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            spent[0] += time.perf_counter() - start[0]
    gc.callbacks.append(on_gc)
    return spent


def decode_limit(model, batch: int, mean_kv: float, bandwidth: float) -> tuple[float, float]:
    """(bytes read per decode step, tokens/s if a step only read weights and the filled KV cache)."""
    c = model.config
    weight_bytes = n_params(model) * 2
    kv_bytes = batch * mean_kv * c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2
    step_bytes = weight_bytes + kv_bytes
    return step_bytes, batch / (step_bytes / bandwidth)


def hf_generate(shape: str, batch: int, prompt: int, new: int, cache: str | None) -> float:
    """Seconds for `generate` of `new` tokens after `batch` random prompts of `prompt` tokens (greedy,
    no early stop), on the engine's model (same seed). Run in a child process of its own (`in_child`)."""
    torch.manual_seed(0)
    model = random_qwen(shape)
    ids = torch.randint(2, 400, (batch, prompt), device="cuda")
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    if cache:
        kw["cache_implementation"] = cache
    model.generate(ids, attention_mask=torch.ones_like(ids), **kw)  # warm-up on the same shapes (static cache, kernels)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def in_child(fn, *args):
    """fn(*args) in a fresh spawned process: the baselines and the engine do not share compiled
    code, allocator state or threads (in one process, whichever ran second was slower)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def pure_decode(engine: FastEngine, batch: int, prompt: int, new: int) -> float:
    """Median seconds per decode step with every row active at mid-episode length (graph replays)."""
    kv = prompt + new // 2
    engine.pos.fill_(kv)
    engine.count.zero_()
    engine.stop_at.fill_(1 << 40)
    engine.forced_ids.fill_(-1)
    engine.tok.random_(0, 400)
    eos, stops = engine.eos.clone(), engine.stops
    engine.eos.zero_()  # keep every row active for the timing
    engine.stops = []

    def burst():
        engine.pos.fill_(kv)
        engine.active.fill_(True)
        engine._decode(engine.cache_len(kv + engine.burst + 1), 1.0, 1.0)
    sec = time_cuda(burst, repeats=10) / engine.burst
    engine.eos.copy_(eos)
    engine.stops = stops
    return sec


def prefill_ms(engine: FastEngine, width: int, start: int) -> float:
    """Milliseconds of one prefill graph writing `width` tokens from position `start` into every
    cache row (a wave of prompts from 0, or replies after the episode's text)."""
    n, dev = engine.net.slots, engine.net.device
    ids = torch.randint(5, 400, (n, width), device=dev)
    positions = (start + torch.arange(width, device=dev))[None].expand(n, width).contiguous()
    rows = torch.arange(n, device=dev)
    kv_len = engine.cache_len(start + width)
    return 1e3 * time_cuda(lambda: engine._append(ids, positions, rows, kv_len, from_start=start == 0))


def profile_decode(engine: FastEngine, prompt: int, new: int, rows: int = 25) -> None:
    """Print the GPU kernels of decode bursts (all rows active), by total device time."""
    from torch.profiler import ProfilerActivity, profile
    pure_decode(engine, engine.net.slots, prompt, new)  # the same state as the timing
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine._decode(engine.cache_len(prompt + new // 2 + engine.burst + 1), 1.0, 1.0)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows), flush=True)


def profile_phase(model, env, examples, forced, engine: FastEngine, rows: int = 30) -> None:
    """Print the GPU kernels and CPU operations of a whole multi-turn rollout phase."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_rollouts(model, env, examples, 1.0, 1.0, 0, 2, 0, forced=forced, engine=engine)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows), flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)


def profile_host(model, env, examples, forced, engine: FastEngine, rows: int = 30) -> None:
    """Print the host's Python functions during a whole multi-turn rollout phase (cProfile), by own
    time and by cumulative time: where the host spends a phase, waits for the device included."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    run_rollouts(model, env, examples, 1.0, 1.0, 0, 2, 0, forced=forced, engine=engine)
    torch.cuda.synchronize()
    prof.disable()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof).sort_stats(key).print_stats(rows)


def profile_gaps(model, env, examples, forced, engine: FastEngine, top: int = 12) -> dict:
    """Where the GPU sits idle in a whole multi-turn phase: the profiler's device activity (kernels,
    copies) merged into busy intervals, and each idle stretch inside the phase charged to the
    innermost host step running then (the engine's settle / prefill / upload / launch / read, the
    env's calls). Prints the idle time by host step and the longest gaps; returns the totals."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function
    steps = {"engine.settle": (engine, "_settle"), "engine.prefill": (engine, "_prefill"),
             "engine.upload": (engine, "_upload"), "engine.launch": (engine, "_launch"),
             "engine.read": (engine, "_read"), "env.submit": (env, "submit"), "env.collect": (env, "collect"),
             "env.reset": (env, "reset")}

    def labelled(name, fn):
        def call(*a, **k):
            with record_function(name):
                return fn(*a, **k)
        return call
    device_ms = {"prefill": [], "decode": []}  # CUDA-event pairs around each prefill and decode burst

    def timed(kind, fn):
        def call(*a, **k):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*a, **k)
            end.record()
            device_ms[kind].append((start, end))
            return out
        return call
    for name, (obj, attr) in steps.items():
        setattr(obj, attr, labelled(name, getattr(obj, attr)))
    if torch.cuda.is_available():
        engine._append, engine._decode = timed("prefill", engine._append), timed("decode", engine._decode)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with record_function("phase"):
                run_rollouts(model, env, examples, 1.0, 1.0, 0, 3, 0, forced=forced, engine=engine)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
    finally:
        for obj, attr in list(steps.values()) + [(engine, "_append"), (engine, "_decode")]:
            if attr in vars(obj):
                delattr(obj, attr)  # back to the class's method
    device = {kind: sum(a.elapsed_time(b) for a, b in pairs) for kind, pairs in device_ms.items()}
    events = prof.events()
    host = [(e.time_range.start, e.time_range.end, e.name) for e in events
            if e.device_type == DeviceType.CPU and (e.name in steps or e.name == "phase")]
    t0, t1 = next((a, b) for a, b, n in host if n == "phase")
    host = [h for h in host if h[2] != "phase"]
    gaps, at = [], t0
    for a, b in device_busy(events) + [[t1, t1]]:
        if a > at:
            gaps.append((at, min(a, t1)))
        at = max(at, b)
    by_step: dict[str, float] = {}
    for a, b in gaps:  # in 20-us bins: the innermost (latest started) host step running at each bin
        for x in np.arange(a, b, 20.0):
            inside = [h for h in host if h[0] <= x < h[1]]
            name = max(inside)[2] if inside else "(none)"
            by_step[name] = by_step.get(name, 0.0) + min(20.0, b - x)
    idle = sum(b - a for a, b in gaps)
    print(f"phase {(t1 - t0) / 1e3:.1f} ms, device busy {(t1 - t0 - idle) / 1e3:.1f} ms (decode bursts "
          f"{device['decode']:.1f} ms, prefill {device['prefill']:.1f} ms in {len(device_ms['prefill'])} graphs), "
          f"idle {idle / 1e3:.1f} ms in {len(gaps)} gaps", flush=True)
    for name, us in sorted(by_step.items(), key=lambda kv: -kv[1]):
        print(f"  idle while {name:16s} {us / 1e3:8.2f} ms", flush=True)
    print("longest gaps (ms from phase start, ms long, host steps running):", flush=True)
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        running = sorted({h[2] for h in host if h[0] < b and h[1] > a})
        print(f"  {(a - t0) / 1e3:8.2f} {(b - a) / 1e3:7.2f}  {', '.join(running)}", flush=True)
    return {"phase_ms": (t1 - t0) / 1e3, "idle_ms": idle / 1e3, "gaps": len(gaps), "device_ms": device,
            "idle_ms_by_step": {k: float(v) / 1e3 for k, v in by_step.items()}}


def zero3_rollout(model, engine: FastEngine, env, examples, forced, step: int, expected: list,
                  plain_tok_s: float) -> dict:
    """The rollout phase of sampling step `step` with the policy inside a DeepSpeed ZeRO-3 engine
    (one process): the weights are gathered once, copied into the engine's buffers, and the phase
    decodes with no collective. The time counts the gather and the copy. Episodes must equal the
    plain run's of the same step (the median phase, whose tokens/s is `plain_tok_s`)."""
    from agents.distributed import ZeroEngine, init_distributed
    dist_ = init_distributed("cuda", use_deepspeed=True)
    zero = ZeroEngine(model, "zero3", 1e-6, 0.0, 1.0, 0, dist_)
    torch.cuda.synchronize()
    t = time.perf_counter()  # the check below is inside the timing: it makes it slightly pessimistic
    before = [w.clone() for w in (engine.net.embed, engine.net.layers[0].qkv, engine.net.layers[-1].down)]
    with zero.generation() as policy:
        engine.load_weights(policy)
        drift = max(float((a.float() - b.float()).abs().max()) for a, b in
                    zip(before, (engine.net.embed, engine.net.layers[0].qkv, engine.net.layers[-1].down)))
        print(f"ZeRO-3 gathered weights vs the engine's copy: max abs diff {drift}", flush=True)
        _, stats = run_rollouts(policy, env, examples, 1.0, 1.0, 0, step, 0, forced=forced, engine=engine)
    torch.cuda.synchronize()
    sec = time.perf_counter() - t
    same = sum(a == e.response_ids for a, e in zip(expected, env.episodes))
    return {"zero3_e2e_tok_s": stats.generated_tokens / sec, "zero3_vs_plain": stats.generated_tokens / sec / plain_tok_s,
            "zero3_identical_episodes": f"{same}/{len(expected)}"}


def run_shape(shape: str, batch: int, prompt: int, new: int, bandwidth: float, tok, hf: bool,
              profile: bool = False, zero3: bool = False, burst: int = 8, attention: str = "auto",
              autotune: bool = False, host_profile: bool = False, gaps: bool = False) -> dict:
    torch.manual_seed(0)
    model = random_qwen(shape)
    row = {"shape": shape, "batch": batch, "params_M": n_params(model) / 1e6}
    step_bytes, limit = decode_limit(model, batch, prompt + new / 2, bandwidth)
    row.update(limit_tok_s=limit, step_MB=step_bytes / 1e6)
    if hf:
        for cache in (None, "static"):
            sec = in_child(hf_generate, shape, batch, prompt, new, cache)
            row[f"hf_{cache or 'default'}_tok_s"] = batch * new / sec
    # pure decode: one CUDA graph per burst, all rows active
    env = make_env(tok, new)
    torch.cuda.reset_peak_memory_stats()
    engine = FastEngine(model, tok, slots=batch, max_len=prompt + new + 256, burst=burst, attention=attention,
                        autotune=autotune)
    sec = pure_decode(engine, batch, prompt, new)
    row.update(decode_ms=sec * 1e3, decode_tok_s=batch / sec, decode_pct_limit=100 * batch / sec / limit)
    # prefill graphs alone: a wave of prompts, and a round of 64-token replies at mid-episode
    row.update(prefill_prompts_ms=prefill_ms(engine, prompt, 0),
               prefill_replies_ms=prefill_ms(engine, 64, prompt + new // 2))
    if profile:
        profile_decode(engine, prompt, new)
    # end to end: two waves of episodes, calls at set positions, replies inserted, slots refilled
    examples = examples_with_prompt(tok, env, 2 * batch, prompt)
    forced = ForcedSchedule.calls_then_answer(tok, "Expert", [new // 5, new // 2], new - 24)
    # warm-up on the same questions (other sampling steps) until a phase captures no new graph: a
    # training run builds them in its first phases and then reuses them (a sampled EOS shifts the
    # rows out of step and can meet new burst shapes); the timed phase reports any it still captures
    for warm in range(3):
        run_rollouts(model, env, examples, 1.0, 1.0, 0, 100 + warm, 0, forced=forced, engine=engine)
        if not engine.timings["captures"]:
            break
    # timed phases (sampling steps 1-7): the host's share of a phase varies from phase to phase and
    # machine to machine, and a sampled EOS ends an episode early and leaves a straggler, so the
    # figures are the phase of median tokens/s, with every phase's time, tokens, decode steps and
    # time in the garbage collector kept
    phases, gc_spent = [], gc_timer()
    for step in range(1, 8):
        seen = set(engine.graphs) | set(engine.prefill_graphs)
        torch.cuda.synchronize()
        t, gc0 = time.perf_counter(), gc_spent[0]
        logps, stats = run_rollouts(model, env, examples, 1.0, 1.0, 0, step, 0, forced=forced, engine=engine)
        torch.cuda.synchronize()
        phases.append((time.perf_counter() - t, step, stats, dict(engine.timings), gc_spent[0] - gc0,
                       [e.response_ids for e in env.episodes]))
        if engine.timings["captures"]:
            print(f"phase {step}: {engine.timings['capture_s']:.1f} s capturing graphs of new shapes "
                  f"{sorted((set(engine.graphs) | set(engine.prefill_graphs)) - seen, key=str)}", flush=True)
    median = sorted(phases, key=lambda p: p[2].generated_tokens / p[0])[len(phases) // 2]
    sec, median_step, stats, tm, _, median_ids = median
    eps = env.episodes  # the last phase's (the same schedule and counts in every phase)
    row.update(e2e_tok_s=stats.generated_tokens / sec, e2e_pct_limit=100 * stats.generated_tokens / sec / limit,
               e2e_s=sec, e2e_s_phases=[p[0] for p in phases],
               e2e_tokens_phases=[p[2].generated_tokens for p in phases],
               e2e_steps_phases=[p[3]["decode_steps"] for p in phases], e2e_gc_s_phases=[p[4] for p in phases],
               e2e_capture_s_phases=[p[3]["capture_s"] for p in phases],
               calls_per_ep=float(np.mean([len(e.calls) for e in eps])),
               policy_tokens=stats.generated_tokens, inserted_tokens=sum(sum(e.inserted) for e in eps),
               prefill_rounds=stats.segments, graphs=len(engine.graphs) + len(engine.prefill_graphs),
               mem_GB=torch.cuda.max_memory_allocated() / 2**30, timings=tm)
    # decode inside the median phase: ms per step, and the share of rows that were decoding
    row.update(e2e_decode_ms=1e3 * tm["decode_s"] / max(tm["decode_steps"], 1),
               e2e_mean_kv=tm["decode_kv_steps"] / max(tm["decode_steps"], 1),
               e2e_occupancy=stats.generated_tokens / max(tm["decode_steps"] * batch, 1),
               e2e_captures=int(tm["captures"]))
    if profile:
        profile_phase(model, env, examples, forced, engine)
    if host_profile:
        profile_host(model, env, examples, forced, engine)
    if gaps:
        row["idle"] = profile_gaps(model, env, examples, forced, engine)
    if hf:
        row["x_hf_default"] = row["e2e_tok_s"] / row["hf_default_tok_s"]
        row["x_hf_static"] = row["e2e_tok_s"] / row["hf_static_tok_s"]
    # the sampler's log-probs against a training forward of the finished sequences
    diffs = []
    for e, lp in list(zip(eps, logps))[:16]:
        ids = torch.tensor([e.prompt_ids + e.response_ids], device="cuda")
        tf, _ = sequence_logprobs(model, ids, torch.ones_like(ids), torch.arange(ids.shape[1], device="cuda")[None])
        policy = torch.tensor([not x for x in e.inserted], device="cuda")
        diffs.append((tf[0, len(e.prompt_ids):][policy] - torch.tensor(lp, device="cuda")).abs().detach())
    d = torch.cat(diffs).float()
    row.update(logp_mismatch_mean=float(d.mean()), logp_mismatch_p99=float(d.quantile(0.99)))
    if zero3:  # last: the model is partitioned from here on
        row.update(zero3_rollout(model, engine, env, examples, forced, median_step, median_ids, row["e2e_tok_s"]))
    del engine, model
    torch.cuda.empty_cache()
    return row


def check_graphs_match_eager(tok) -> dict:
    """On the GPU: the CUDA-graph engine's greedy episodes equal the simple path's (float32 model)."""
    torch.manual_seed(0)
    model = random_qwen("0.5b", dtype=torch.float32)
    env = make_env(tok, 96)
    examples = examples_with_prompt(tok, env, 12, 64)
    forced = ForcedSchedule.calls_then_answer(tok, "Expert", [10, 40], 70)
    ref, _ = run_rollouts(model, env, examples, 0.0, 1.0, 0, 0, 0, forced=forced)
    ref_ids = [e.response_ids for e in env.episodes]
    engine = FastEngine(model, tok, slots=5, max_len=512, burst=8, bucket=128)
    got, _ = run_rollouts(model, env, examples, 0.0, 1.0, 0, 0, 0, forced=forced, engine=engine)
    same = sum(a == e.response_ids for a, e in zip(ref_ids, env.episodes))
    err = max(float((torch.tensor(a) - torch.tensor(b)).abs().max()) for a, b in zip(ref, got))
    del model, engine
    torch.cuda.empty_cache()
    return {"episodes": len(examples), "identical": same, "max_logp_diff": err,
            "calls": sum(len(e.calls) for e in env.episodes)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="0.5b:64,1.5b:64,3b:64,3b:128", help="shape:batch pairs")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers generate baselines")
    p.add_argument("--check", action="store_true", help="first check graphs against the eager path")
    p.add_argument("--profile", action="store_true", help="print the kernels of a decode burst")
    p.add_argument("--profile-host", action="store_true", help="print the host's Python profile of a phase")
    p.add_argument("--profile-gaps", action="store_true",
                   help="print where the GPU sits idle in a phase, by the host step running then")
    p.add_argument("--zero3", action="store_true", help="also time the first shape's rollout under DeepSpeed ZeRO-3")
    p.add_argument("--burst", type=int, default=8, help="decode steps per graph replay")
    p.add_argument("--attention", default="auto", choices=("auto", "triton", "matmul"),
                   help="the decode step's attention (FastEngine's `attention`)")
    p.add_argument("--autotune", action="store_true", help="time Triton and cuBLAS kernels for the decode matmuls")
    p.add_argument("--tag", default="", help="written to runs/bench/rollout_<tag>_<gpu>_<date>.json")
    args = p.parse_args()
    tok = bpe_tokenizer(CORPUS, 500)
    check = check_graphs_match_eager(tok) if args.check else None
    if check:
        print("graph vs simple path (greedy, float32):", check, flush=True)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    items = args.shapes.split(",")
    for n, item in enumerate(items):
        shape, batch = item.split(":")
        rows.append(run_shape(shape, int(batch), args.prompt, args.new, bandwidth, tok, not args.no_hf, args.profile,
                              args.zero3 and n == 0, args.burst, args.attention, args.autotune,
                              args.profile_host, args.profile_gaps))
        print(rows[-1], flush=True)
    cols = ["shape", "batch", "limit_tok_s", "hf_default_tok_s", "hf_static_tok_s", "decode_ms", "decode_tok_s",
            "decode_pct_limit", "prefill_prompts_ms", "prefill_replies_ms", "e2e_tok_s", "e2e_pct_limit",
            "e2e_decode_ms", "e2e_occupancy", "e2e_captures",
            "x_hf_default", "x_hf_static", "mem_GB",
            "logp_mismatch_mean", "logp_mismatch_p99", "zero3_vs_plain"]
    print(table(rows, cols))
    path = write_results("_".join(filter(None, ["rollout", args.tag])),
                         {"check": check, "burst": args.burst, "attention": args.attention, "autotune": args.autotune,
                          "copy_bandwidth_Bps": bandwidth,
                          "prompt": args.prompt, "new": args.new, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
