"""The one place that knows about processes and optimizers: process-group start-up, metric
all-reduce, rank-0 helpers, and the training engines (plain PyTorch, or DeepSpeed ZeRO-2/3)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from agents.collectives import all_reduce
from agents.policy import decoder_layers

DEEPSPEED_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"
log = logging.getLogger(__name__)


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
        return all_reduce(t, "sum") if self.world_size > 1 else t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce(t, "max") if self.world_size > 1 else t

    def all_gather(self, obj) -> list:
        """Every rank's picklable `obj`, in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_gather_floats(self, values: list[float]) -> list[float]:
        """Every rank's values, concatenated in rank order."""
        return [v for part in self.all_gather(list(values)) for v in part]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


# ---------------------------------------------------------------- start-up

def sanitize_cuda_arch_list(env: dict = os.environ) -> None:
    """DeepSpeed's JIT op builder parses TORCH_CUDA_ARCH_LIST entries as integers, so an entry such as
    `9.0a` (set by some CUDA images) makes every build fail; strip the letter suffixes in place."""
    value = env.get("TORCH_CUDA_ARCH_LIST")
    if value:
        env["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d+\.\d+)[a-zA-Z]+", r"\1", value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto", use_deepspeed: bool = False) -> Dist:
    """Start the process group when launched by torchrun (NCCL on GPUs, gloo on CPU).

    With DeepSpeed the group is started by `deepspeed.init_distributed` even for one process (its
    engines need one); a plain `python train.py` then gets the rank variables of a 1-process job,
    or DeepSpeed would go looking for MPI.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA device is visible")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank} has LOCAL_RANK={local_rank} but this node shows "
                               f"{torch.cuda.device_count()} CUDA device(s): launch at most that many processes "
                               "per node (torchrun --nproc_per_node), or set device=cpu")
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if use_deepspeed and not dist.is_initialized():
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
        sanitize_cuda_arch_list()
        if not use_cuda:  # DeepSpeed picks its accelerator by what it finds: CUDA on a GPU machine
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        deepspeed.init_distributed(dist_backend=backend)
    elif world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank, world_size, local_rank, dev)


def per_rank(key: str, global_size: int, world_size: int) -> int:
    """A global batch size split over ranks; sizes that do not divide are an error naming the key."""
    if global_size % world_size or global_size < world_size:
        raise ValueError(f"{key}={global_size} is a global size and must be a multiple of the world size "
                         f"{world_size}; change it or the number of processes")
    return global_size // world_size


def lockstep(items: list, dist_: Dist) -> list:
    """`items` padded with None up to the longest list on any rank. Under ZeRO-3 every forward and
    backward is a collective, so all ranks must make the same number of passes; a None is a pass
    with no data (`idle_forward`)."""
    n = int(dist_.all_reduce_max(torch.tensor([len(items)], dtype=torch.long)).item())
    return list(items) + [None] * (n - len(items))


def idle_forward(model: nn.Module, device: torch.device) -> torch.Tensor:
    """A one-token forward pass whose output times zero is a loss with zero gradient."""
    ones = torch.ones(1, 1, dtype=torch.long, device=device)
    out = model(input_ids=ones, attention_mask=ones, position_ids=torch.zeros_like(ones))
    out = out.logits if hasattr(out, "logits") else out
    return out.float().sum() * 0.0


def broadcast_module(module: nn.Module, dist_: Dist) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical start, whatever ran before)."""
    if dist_.world_size > 1:
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)


def warmup_schedule(warmup_steps: int):
    """Linear learning-rate warm-up over `warmup_steps` optimizer steps, then constant."""
    return lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0


# ---------------------------------------------------------------- engines

class PlainEngine:
    """A model and its AdamW optimizer, with gradient clipping and a linear warm-up schedule.

    Under data parallelism (torchrun without DeepSpeed) gradients are SUMMED over ranks in `step`:
    each rank's loss is already divided by the global count of the optimizer step (agents.losses),
    so the sum is exactly the gradient of the whole batch's loss.
    """

    def __init__(self, module: nn.Module, lr: float, weight_decay: float, grad_clip: float,
                 warmup_steps: int, dist_: Dist):
        self.module, self.grad_clip, self.dist = module, grad_clip, dist_
        self.model = module  # what forward passes call
        params = [p for p in module.parameters() if p.requires_grad]
        fused = dist_.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_schedule(warmup_steps))
        broadcast_module(module, dist_)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def idle_backward(self) -> None:
        """A backward pass that adds nothing (keeps ranks in step; see `lockstep`)."""
        idle_forward(self.model, self.dist.device).backward()

    def step(self, skip: bool = False) -> float:
        """Sum gradients over ranks, clip, and step; `skip` (decided on all ranks) drops them.
        Returns the gradient norm before clipping (nan when skipped)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.dist.world_size > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        norm = float("nan")
        if not skip:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
            if torch.isfinite(torch.tensor(norm)):
                self.optimizer.step()
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @contextlib.contextmanager
    def generation(self) -> Iterator[nn.Module]:
        """The module to sample from (all its weights are local)."""
        yield self.module

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """A CPU copy of every weight (a collective under ZeRO-3; here, local)."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def save(self, path: Path) -> None:
        """Weights and optimizer state; rank 0 writes (ranks hold identical copies)."""
        if self.dist.is_main:
            path.mkdir(parents=True, exist_ok=True)
            torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, path / "engine.pt")

    def load(self, path: Path) -> None:
        state = torch.load(path / "engine.pt", map_location=self.dist.device, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def deepspeed_config(name: str, lr: float, weight_decay: float, grad_clip: float, on_cuda: bool,
                     with_optimizer: bool = True, processes: int = 1) -> dict:
    """configs/deepspeed/<name>.json (or the JSON file `name` ends in .json) with the values our
    config owns filled in.

    One micro-batch per gradient-accumulation window in DeepSpeed's own bookkeeping: the trainer calls
    `backward` once per micro-batch and `step` once per optimizer step (unmanaged accumulation), and
    every loss is already normalised by the step's global count. bf16 with fp32 master weights on
    GPUs, fp32 on CPU. Without an optimizer (the frozen reference) ZeRO-2 is plain data parallel.
    In a single process ZeRO-1/2 has no gradients to communicate, so the stream that overlaps their
    reduction and the contiguous buffer they are copied into are turned off: each only added work
    (bench/README.md, "Update runs").
    """
    path = Path(name) if name.endswith(".json") else DEEPSPEED_CONFIGS / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in DEEPSPEED_CONFIGS.glob("*.json"))
        raise ValueError(f"deepspeed={name!r}: no {path}; known configs: {known}")
    cfg = json.loads(path.read_text())
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
               managed_gradient_accumulation=False, gradient_clipping=grad_clip)
    cfg["bf16"] = {"enabled": on_cuda}
    if processes == 1 and cfg["zero_optimization"]["stage"] in (1, 2):
        cfg["zero_optimization"].update(overlap_comm=False, contiguous_gradients=False)
    if with_optimizer:
        cfg["optimizer"]["params"].update(lr=lr, weight_decay=weight_decay)
        offload = "offload_optimizer" in cfg["zero_optimization"]
        if on_cuda and cfg["optimizer"]["params"].get("torch_adam") and not offload:
            cfg["optimizer"]["params"].setdefault("fused", True)  # PyTorch's one-kernel AdamW on the fp32 partition
    else:
        cfg.pop("optimizer", None)
        zero = cfg["zero_optimization"]
        zero.pop("offload_optimizer", None)
        if zero["stage"] != 3:
            cfg["zero_optimization"] = {"stage": 0}
    return cfg


def gather_layers_whole(module: nn.Module, config: dict) -> None:
    """Under ZeRO-3, make each decoder layer a leaf module: its parameters are gathered in one call
    behind one hook, not one per submodule, which is faster (bench/README.md, "Update runs")."""
    if config["zero_optimization"]["stage"] == 3:
        from deepspeed.utils import set_z3_leaf_modules
        set_z3_leaf_modules(module, [type(decoder_layers(module)[0])])


class ZeroEngine:
    """A DeepSpeed engine behind PlainEngine's interface.

    Loss semantics: DeepSpeed averages gradients over data-parallel ranks, while each rank's loss is
    already divided by the GLOBAL count of the optimizer step, so `backward` multiplies the loss by
    the world size (DeepSpeed's division by gradient_accumulation_steps is a division by 1). Then the
    update equals a single process's update on the whole batch.
    """

    def __init__(self, module: nn.Module, name: str, lr: float, weight_decay: float, grad_clip: float,
                 warmup_steps: int, dist_: Dist):
        import deepspeed
        self.module, self.dist = module, dist_
        broadcast_module(module, dist_)
        config = deepspeed_config(name, lr, weight_decay, grad_clip, dist_.device.type == "cuda",
                                  processes=dist_.world_size)
        self.stage = config["zero_optimization"]["stage"]
        gather_layers_whole(module, config)
        params = [p for p in module.parameters() if p.requires_grad]
        self.model, *_ = deepspeed.initialize(
            model=module, model_parameters=params, config=config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_schedule(warmup_steps)))

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss * self.dist.world_size)

    def idle_backward(self) -> None:
        self.model.backward(idle_forward(self.model, self.dist.device))

    def step(self, skip: bool = False) -> float:
        """The optimizer step over everything `backward` accumulated since the last step. `skip`
        (decided on all ranks) throws the gradients away instead: no weight or Adam moment moves."""
        if skip:
            self._discard_gradients()
            return float("nan")
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _discard_gradients(self) -> None:
        """What DeepSpeed's own step does when it skips an overflowing fp16 step: drop the accumulated
        and partitioned gradients, and restart accumulation."""
        opt = self.model.optimizer
        opt.zero_grad(set_to_none=True)
        if hasattr(opt, "_release_preflattened_grad_buffers"):
            opt._release_preflattened_grad_buffers()
        if getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False):
            opt.reset_cpu_buffers()
        for name in ("averaged_gradients", "all_grad_tensors"):
            table = getattr(opt, name, None)
            if isinstance(table, dict):
                for k in list(table):
                    table[k] = None
        if hasattr(opt, "_offload_accumulated_param_ids"):
            opt._offload_accumulated_param_ids = set()
        opt.micro_step_id = -1 if self.stage < 3 else 0  # as after a step: the next backward starts afresh
        self.model._unmanaged_backward_count = 0

    @contextlib.contextmanager
    def generation(self) -> Iterator[nn.Module]:
        """The module to sample from. Under ZeRO-3 its weights are gathered ONCE for the whole rollout
        phase and ZeRO's per-module hooks are lifted meanwhile, so decoding a token costs no
        collective (and ranks may decode different numbers of tokens); on exit the weights are
        partitioned again and the hooks restored."""
        if self.stage < 3:
            yield self.module
            return
        import deepspeed
        offload = self.model.optimizer.parameter_offload
        with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
            offload._remove_module_hooks()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield self.module
            finally:
                offload.setup_zero_stage3_hooks()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """A CPU copy of every weight on rank 0 (None elsewhere); a collective under ZeRO-3."""
        if self.stage == 3:
            return self.model._zero3_consolidated_16bit_state_dict()
        if not self.dist.is_main:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def save(self, path: Path) -> None:
        """A DeepSpeed checkpoint (every rank writes its shards; all ranks call)."""
        self.model.save_checkpoint(str(path), tag="engine", save_latest=False)

    def load(self, path: Path) -> None:
        load_path, _ = self.model.load_checkpoint(str(path), tag="engine", load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")


@dataclass
class StepEngines:
    """The engines one optimizer step trains, by name ("actor", "critic"; None: not trained in this
    step). They keep ZeRO's ranks in step, where every pass is a collective: a rank with fewer
    micro-batches than another makes idle passes, and a non-finite loss on any rank makes every
    rank skip the step."""

    engines: dict[str, PlainEngine | ZeroEngine | None]
    dist: Dist
    finite: bool = field(default=True, init=False)

    def trains(self, name: str) -> bool:
        return self.engines.get(name) is not None

    def passes(self, pieces: list) -> Iterator:
        """This rank's micro-batches; after them, idle passes while another rank still has some."""
        for piece in lockstep(pieces, self.dist):
            if piece is not None:
                yield piece
                continue
            for engine in self.engines.values():
                if engine is not None:
                    engine.idle_backward()

    def backward(self, name: str, loss: torch.Tensor) -> None:
        """Backward through engine `name`, even for a non-finite loss: the ranks stay in step, and
        `step` drops the gradients."""
        self.finite &= bool(torch.isfinite(loss))
        self.engines[name].backward(loss)

    def step(self) -> dict[str, float]:
        """One optimizer step of every engine, or of none when any rank saw a non-finite loss since
        the last step; each engine's gradient norm (nan when skipped)."""
        skip = bool(self.dist.all_reduce_max(torch.tensor([0.0 if self.finite else 1.0])).item() > 0)
        self.finite = True
        out = {}
        if skip:
            log.warning("non-finite loss: skipping this optimizer step on every rank")
            out["train/skipped_updates"] = 1.0
        for name, engine in self.engines.items():
            if engine is not None:
                out[f"{name}/grad_norm"] = engine.step(skip)
        return out


def make_engine(module: nn.Module, lr: float, weight_decay: float, grad_clip: float, warmup_steps: int,
                dist_: Dist, deepspeed: str | None) -> PlainEngine | ZeroEngine:
    """PlainEngine without DeepSpeed, else a ZeroEngine for `deepspeed` (see `deepspeed_config`)."""
    if deepspeed is None:
        return PlainEngine(module, lr, weight_decay, grad_clip, warmup_steps, dist_)
    return ZeroEngine(module, deepspeed, lr, weight_decay, grad_clip, warmup_steps, dist_)


def wrap_reference(module: nn.Module, dist_: Dist, deepspeed: str | None) -> nn.Module:
    """The frozen reference model, ready for inference: as is without DeepSpeed, else an engine with
    no optimizer (bf16 on GPUs; its weights sharded under ZeRO-3)."""
    broadcast_module(module, dist_)
    if deepspeed is None:
        return module
    import deepspeed as ds
    config = deepspeed_config(deepspeed, 0.0, 0.0, 0.0, dist_.device.type == "cuda", with_optimizer=False,
                              processes=dist_.world_size)
    gather_layers_whole(module, config)
    engine, *_ = ds.initialize(model=module, config=config)
    engine.eval()
    return engine
