"""Shared pieces of the GPU benchmarks: random Qwen2.5-shaped models, the two hardware ceilings
measured in the same process, event timing, and the JSON result file."""

from __future__ import annotations

import datetime
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from envs.atomic import write_text_atomic
from envs.bpe import byte_level_bpe

# Scratch results go to an ignored folder; a run that README or bench/README.md cites is copied into
# bench/results/ by hand (one file per bench x shape x GPU).
RESULTS = Path(__file__).resolve().parent.parent / "runs" / "bench"

# Qwen2.5 shapes (hidden, layers, heads, kv heads, intermediate, tied embeddings)
SHAPES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, tie_word_embeddings=True),
    "3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008, tie_word_embeddings=True),
}
VOCAB = 151936


def random_qwen(shape: str, device: str = "cuda", dtype=torch.bfloat16, max_positions: int = 4096):
    """A random-weight Qwen2.5-shaped causal LM (SDPA attention) built directly on `device`."""
    cfg = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=max_positions, rope_theta=1e6,
                      rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=1, **SHAPES[shape])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def time_cuda(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of `fn` over `repeats` runs, timed with CUDA events after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 2
    bufs = [torch.randn(n // 2, device="cuda").view(torch.bfloat16) for _ in range(3)]
    out = torch.empty_like(bufs[0])
    k = [0]

    def copy():
        k[0] = (k[0] + 1) % 3
        out.copy_(bufs[k[0]])
    return 2 * out.numel() * out.element_size() / time_cuda(copy, repeats=20)


def matmul_rate(n: int = 8192, rounds: int = 5) -> float:
    """bf16 matrix product rate in FLOP/s on random data (n x n x n, rotating among inputs): the best
    of `rounds` timings, so a GPU still raising its clocks does not lower the bar for MFU."""
    a = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    b = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    k = [0]

    def mm():
        k[0] ^= 1
        return a[k[0]] @ b[k[0]]
    return max(2 * n**3 / time_cuda(mm, repeats=20, warmup=3) for _ in range(rounds))


def gpu_tag() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return name.lower().replace("nvidia", "").strip().split()[0]


def write_results(kind: str, payload: dict) -> Path:
    """Write `runs/bench/<kind>_<gpu>_<date>.json` (temp file, then rename)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    tag = gpu_tag() if kind != "env_step" else "cpu"
    path = RESULTS / f"{kind}_{tag}_{date}.json"
    payload = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "date": date, **payload}
    write_text_atomic(path, json.dumps(payload, indent=2))
    out = os.environ.get("OUT")  # the device tool brings this folder back
    if out:
        Path(out, path.name).write_text(json.dumps(payload, indent=2))
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` restricted to `columns`."""
    def fmt(v):
        return f"{v:,.3g}" if isinstance(v, float) and abs(v) < 100 else (f"{v:,.0f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def bpe_tokenizer(corpus: list[str], vocab_size: int, repeat: int = 5):
    """A small byte-level BPE trained on `corpus` (any text round-trips; ids past its vocabulary
    decode to nothing, as a checkpoint's padded vocabulary slots do), with distinct pad and eos."""
    return byte_level_bpe(corpus * repeat, vocab_size)


def device_busy(events) -> list[list[float]]:
    """The profiler's device activity (kernels, copies, memsets) merged into busy intervals [start,
    end] in microseconds, in time order."""
    from torch.autograd import DeviceType
    merged: list[list[float]] = []
    for a, b in sorted((e.time_range.start, e.time_range.end) for e in events
                       if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged
