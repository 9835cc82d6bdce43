"""The one place that knows about processes and optimizers: process-group start-up, metric
all-reduce, rank-0 helpers, and the training engines (plain PyTorch, or DeepSpeed ZeRO-2/3)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def all_gather_floats(self, values: list[float]) -> list[float]:
        """Every rank's values, concatenated in rank order."""
        if self.world_size == 1:
            return list(values)
        out: list = [None] * self.world_size
        dist.all_gather_object(out, list(values))
        return [v for part in out for v in part]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device: str = "auto") -> Dist:
    """Start the process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA device is visible")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world_size, local_rank, dev)


class PlainEngine:
    """A model and its AdamW optimizer, with gradient clipping and a linear warm-up schedule.

    Under data parallelism (torchrun without DeepSpeed) gradients are SUMMED over ranks in `step`:
    each rank's loss is already divided by the global count of the optimizer step (agents.losses),
    so the sum is exactly the gradient of the whole batch's loss.
    """

    def __init__(self, module: nn.Module, lr: float, weight_decay: float, grad_clip: float,
                 warmup_steps: int, dist_: Dist):
        self.module, self.grad_clip, self.dist = module, grad_clip, dist_
        params = [p for p in module.parameters() if p.requires_grad]
        fused = dist_.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0)
        if dist_.world_size > 1:
            for p in params:  # identical start on every rank
                dist.broadcast(p.data, src=0)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, skip: bool = False) -> float:
        """Average gradients over ranks, clip, and step; `skip` (decided on all ranks) drops them.
        Returns the gradient norm before clipping (nan when skipped)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.dist.world_size > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        norm = float("nan")
        if not skip:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
            if torch.isfinite(torch.tensor(norm)):
                self.optimizer.step()
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
