"""All-reduce that works for a tensor on any device: under NCCL a CPU tensor (batch statistics are
kept on the CPU) travels through the current GPU and comes back; a single process returns a copy."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The elementwise sum (or max) of `t` over all ranks, on `t`'s device; `t` is not modified."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t.clone()
    device = t.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    buf = t.detach().to(device, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return buf.to(t.device)
