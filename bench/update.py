"""PPO update benchmark (actor + critic, Qwen2.5-1.5B shape): our loss path (length-bucketed
micro-batches, chunked log-probs, optional gradient checkpointing) against a plain PyTorch step
(padded micro-batches, full float32 logits), then the same loss through the project's DeepSpeed
engines (ZeRO-2 and ZeRO-3, bf16 with fp32 master weights), as achieved FLOP/s over the measured
bf16 matmul rate, counted over non-padding tokens.

    python -m bench.update [--shape 1.5b] [--sequences 64] [--tokens 8192] [--no-deepspeed]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from agents.batch import micro_batch_rows
from agents.distributed import Dist, PlainEngine, ZeroEngine, init_distributed
from agents.losses import agg_loss, policy_loss, value_loss
from agents.policy import build_critic, chunked_sequence_logprobs, compile_layers, sequence_logprobs, sequence_values
from bench.common import device_busy, matmul_rate, n_params, random_qwen, table, write_results


def model_flops(actor, critic, lengths: list[int]) -> float:
    """6 x params x tokens for each model (forward + backward), plus causal attention 6 L h T^2
    per sequence for each model; recomputation from checkpointing is not counted."""
    c = actor.config
    tokens = sum(lengths)
    attn = sum(6 * c.num_hidden_layers * c.hidden_size * n * n for n in lengths)
    return 6 * (n_params(actor) + n_params(critic)) * tokens + 2 * attn


def padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def plain_logprobs(actor, ids, mask, pos, pack=False):
    """The plain path: full (B, T, V) logits, float32 log-softmax over the whole vocabulary."""
    logits = actor(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    ent = -(logp.exp() * logp).sum(-1)
    lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    z = torch.zeros_like(lp[:, :1])
    return torch.cat([z, lp], 1), torch.cat([z, ent], 1)


def ours_logprobs(actor, ids, mask, pos, pack=False):
    """The trainer's path without DeepSpeed: the LM head applied chunk by chunk, recomputed in backward."""
    return chunked_sequence_logprobs(actor, ids, mask, pos, with_entropy=True, pack=pack)


def ds_logprobs(actor, ids, mask, pos, pack=False):
    """The trainer's path under DeepSpeed: the model's bf16 logits, float32 log-softmax chunk by chunk."""
    return sequence_logprobs(actor, ids, mask, pos, with_entropy=True, pack=pack)


def step(actor, critic, groups, logprob_fn, pack: bool = False) -> None:
    """One optimizer step of both engines over all micro-batches (token-mean over all tokens)."""
    denom = float(sum(sum(len(s) for s in g) for g in groups))
    for g in groups:
        ids, mask, pos = padded(g)
        logp, ent = logprob_fn(actor.model, ids, mask, pos, pack=pack)
        old = logp.detach() + 0.01 * torch.randn_like(logp)
        adv = torch.randn_like(logp)
        pg, _ = policy_loss(logp, old, adv, 0.2, None)
        actor.backward(agg_loss(pg, mask.float(), "token-mean", denom)
                       - 1e-3 * agg_loss(ent, mask.float(), "token-mean", denom))
        v = sequence_values(critic.model, ids, mask, pos, pack=pack).float()
        vl = value_loss(v, v.detach() + 0.1, torch.randn_like(v), 0.5)
        critic.backward(agg_loss(vl, mask.float(), "token-mean", denom))
    actor.step()
    critic.step()


def groups_of(seqs, budget: int, sort: bool, pack: bool = False) -> list[list[torch.Tensor]]:
    """Micro-batches of at most `budget` tokens: the trainer's (`micro_batch_rows`: sorted by length,
    padded or packed), or the naive split in the given order."""
    if sort:
        return [[seqs[i] for i in rows.tolist()] for rows in micro_batch_rows([len(s) for s in seqs], budget, pack)]
    out, cur = [], []
    for s in seqs:
        if cur and max(len(x) for x in cur + [s]) * (len(cur) + 1) > budget:
            out.append(cur)
            cur = []
        cur.append(s)
    return out + [cur]


def fresh_models(shape: str, attention: str = "sdpa", compile: bool = False):
    torch.manual_seed(0)
    actor = random_qwen(shape).train()
    actor.set_attn_implementation(attention)  # the critic's trunk is built from the same config
    with torch.device("cuda"):
        critic = build_critic(actor, "random").train()
    if compile:
        for m in (actor, critic):
            compile_layers(m)
    return actor, critic


def engines(actor, critic, stage: str | None, dist_: Dist):
    """Both models behind the trainer's engines: PlainEngine (bf16 weights, fused AdamW) or ZeroEngine."""
    if stage is None:
        return tuple(PlainEngine(m, 1e-6, 0.0, 1.0, 0, dist_) for m in (actor, critic))
    return tuple(ZeroEngine(m, stage, 1e-6, 0.0, 1.0, 0, dist_) for m in (actor, critic))


def profile_step(actor, critic, groups, logprob_fn, pack: bool, rows: int = 20) -> dict:
    """One step under the profiler: its wall time against the device's busy time (a gap means the
    host held the device up), and the kernels and host operations that take the most time."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        step(actor, critic, groups, logprob_fn, pack)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    busy = sum(b - a for a, b in device_busy(prof.events())) / 1e6
    print(f"profiled step: wall {wall:.3f} s, device busy {busy:.3f} s", flush=True)
    for key in ("cuda_time_total", "self_cpu_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)
    return {"profiled_wall_s": wall, "profiled_busy_s": busy}


def measure(name, actor, critic, seqs, budget, sort, logprob_fn, peak, flops, repeats: int = 3,
            pack: bool = False, profile: bool = False) -> dict:
    groups = groups_of(seqs, budget, sort, pack)
    step(actor, critic, groups, logprob_fn, pack)  # warm-up (optimizer state, kernels, compiles)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(repeats):
        step(actor, critic, groups, logprob_fn, pack)
    torch.cuda.synchronize()
    sec = (time.perf_counter() - t) / repeats
    lengths = [len(s) for s in seqs]
    padded_tokens = sum(lengths) if pack else sum(len(g) * max(len(s) for s in g) for g in groups)
    row = {"path": name, "step_s": sec, "tokens": sum(lengths), "padding_pct": 100 * (1 - sum(lengths) / padded_tokens),
           "micro_batches": len(groups), "tok_s": sum(lengths) / sec, "TFLOP_s": flops / sec / 1e12,
           "mfu_pct": 100 * flops / sec / peak, "mem_GB": torch.cuda.max_memory_allocated() / 2**30}
    if profile:
        row.update(profile_step(actor, critic, groups, logprob_fn, pack))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.5b")
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--min-len", type=int, default=256)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=8192, help="padded tokens per micro-batch")
    p.add_argument("--no-deepspeed", action="store_true", help="skip the ZeRO-2 and ZeRO-3 rows")
    p.add_argument("--flex", action="store_true", help="add rows with packed micro-batches and FlexAttention")
    p.add_argument("--ds-configs", nargs="*", default=[], help="more DeepSpeed JSON files to time (packed with "
                   "FlexAttention under --flex)")
    p.add_argument("--only", default="", help="run only the rows whose name contains this text (DeepSpeed keeps "
                   "some memory after its engines are deleted: time ZeRO-3 in a process of its own)")
    p.add_argument("--compile", action="store_true", help="torch.compile every decoder layer (model.compile_layers)")
    p.add_argument("--profile", action="store_true", help="profile one more step of each row: wall against device "
                   "busy time, top kernels and host operations")
    p.add_argument("--tag", default="", help="written to runs/bench/update_<tag>_<gpu>_<date>.json")
    args = p.parse_args()
    peak = matmul_rate()
    print(f"bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.sequences,), generator=g).tolist()
    seqs = [torch.randint(2, 150000, (n,), generator=g).cuda() for n in lengths]
    dist_ = init_distributed("cuda", use_deepspeed=not args.no_deepspeed)
    rows = []

    def run(name, stage, budget, sort, logprob_fn, checkpointing=False, pack=False, attention="sdpa"):
        if args.only and args.only not in name:
            return
        actor, critic = fresh_models(args.shape, attention, args.compile)
        if checkpointing:
            for m in (actor, critic.trunk):
                m.gradient_checkpointing_enable()
        flops = model_flops(actor, critic, lengths)  # before ZeRO-3 partitions the parameters
        a = c = None
        try:
            a, c = engines(actor, critic, stage, dist_)
            rows.append(measure(name, a, c, seqs, budget, sort, logprob_fn, peak, flops, pack=pack,
                                profile=args.profile))
        except Exception as e:  # a row that fails (e.g. a compile error) is reported, the others still run
            rows.append({"path": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        print(rows[-1], flush=True)
        del actor, critic, a, c
        gc.collect()
        torch.cuda.empty_cache()

    run("naive: padded, full fp32 logits", None, args.tokens, False, plain_logprobs)
    run("ours, plain PyTorch: bucketed, chunked LM head", None, args.tokens, True, ours_logprobs)
    run("ours, plain PyTorch + gradient checkpointing, 2x tokens", None, 2 * args.tokens, True, ours_logprobs,
        checkpointing=True)
    run("plain PyTorch, DeepSpeed rows' path: bucketed, bf16 logits", None, args.tokens, True, ds_logprobs)
    if args.flex:
        run("ours, plain PyTorch: packed, FlexAttention", None, args.tokens, True, ours_logprobs, pack=True,
            attention="flex_attention")
        run("plain PyTorch, DeepSpeed rows' path: packed, FlexAttention", None, args.tokens, True, ds_logprobs,
            pack=True, attention="flex_attention")
    if not args.no_deepspeed:
        run("ours, DeepSpeed ZeRO-2 (bf16, fp32 master)", "zero2", args.tokens, True, ds_logprobs)
        if args.flex:
            run("ours, DeepSpeed ZeRO-2: packed, FlexAttention", "zero2", args.tokens, True, ds_logprobs, pack=True,
                attention="flex_attention")
        run("ours, DeepSpeed ZeRO-3 (zero3)", "zero3", args.tokens, True, ds_logprobs)
        for path in args.ds_configs:
            if args.flex:
                run(f"ours, DeepSpeed {path}: packed, FlexAttention", path, args.tokens, True, ds_logprobs, pack=True,
                    attention="flex_attention")
            else:
                run(f"ours, DeepSpeed {path}", path, args.tokens, True, ds_logprobs)
    print(table(rows, ["path", "step_s", "tokens", "padding_pct", "micro_batches", "tok_s", "TFLOP_s", "mfu_pct", "mem_GB"]))
    path = write_results("_".join(filter(None, ["update", args.tag])), {"shape": args.shape, "matmul_Fps": peak, "lengths": lengths, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
