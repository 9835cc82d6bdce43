"""Data parallelism on CPU (torchrun, gloo): on the same saved global RolloutBatch, a 2-process update
(plain, DeepSpeed ZeRO-2, ZeRO-3) gives the loss, advantages and weights of a 1-process update; a
non-finite loss on one rank skips the step everywhere; DeepSpeed checkpoints resume exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import TINY_RUN

from agents.distributed import deepspeed_config, init_distributed, per_rank, sanitize_cuda_arch_list

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "dist_worker.py")
# DeepSpeed JIT-builds a CPU op the first time on a fresh machine (about a minute): generous timeouts
TIMEOUT_S = 900

TINY = [
    *TINY_RUN, "device=cpu", "task.n_test=4", "episode.max_response_tokens=24",
    "sft.enabled=false", "rollout.n_prompts=4", "rollout.forced_turns=[2]", "rollout.forced_answer_at=12",
    "rollout.micro_batch_tokens=150",  # two micro-batches per step in 1 process, one per rank in 2
    "algorithm.minibatch_size=4", "algorithm.ppo_epochs=2",  # two optimizer steps on the whole batch
]


def torchrun(n: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", WORKER,
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """One process, no DeepSpeed: samples the global batch, saves it, and updates on it."""
    root = tmp_path_factory.mktemp("dist")
    torchrun(1, "update", str(root / "ref.pt"), str(root / "batch.pt"), *TINY, f"run_dir={root / 'ref'}")
    return root, torch.load(root / "ref.pt", weights_only=False)


def assert_same_update(ref: dict, got: dict) -> None:
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7)
    assert torch.allclose(torch.tensor(got["advantages"]), torch.tensor(ref["advantages"]), atol=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    for part in ("actor", "critic"):
        for k, w in ref[part].items():
            assert torch.allclose(got[part][k], w, atol=1e-6), f"{part}.{k}"


@pytest.mark.parametrize("engine", ["null", "zero2", "zero3"])
def test_two_processes_update_like_one_process_on_the_same_batch(reference, engine):
    root, ref = reference
    assert ref["change"] > 1e-4, "the reference update did not move the weights"
    out = root / f"{engine}.pt"
    torchrun(2, "update", str(out), str(root / "batch.pt"), *TINY, f"deepspeed={engine}",
             f"run_dir={root / engine}")
    assert_same_update(ref, torch.load(out, weights_only=False))


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_nonfinite_loss_on_one_rank_skips_the_step_everywhere(reference, engine):
    """A NaN on rank 1 only: no weight moves, and the next clean update equals the reference
    (no stale gradients or Adam moments survive the skipped step)."""
    root, ref = reference
    out = root / f"skip_{engine}.pt"
    torchrun(2, "skip", str(out), str(root / "batch.pt"), *TINY, f"deepspeed={engine}",
             f"run_dir={root / ('skip_' + engine)}")
    got = torch.load(out, weights_only=False)
    assert got["skipped"] > 0 and not got["moved"]
    assert_same_update(ref, got)


def policy_weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(ckpt / "policy" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_deepspeed_training_resumes_exactly(tmp_path, engine):
    """2 PPO steps at 2 processes; a run resumed from step 1's checkpoint reaches the same step 2,
    and the consolidated policy loads in transformers."""
    run = [*TINY, f"deepspeed={engine}", "eval_every=0", "save_every=1", "keep_checkpoints=5",
           "total_steps=2"]
    config = ["--config", "configs/routeworld_tiny.yaml"]
    torchrun(2, "train", *config, *run, f"run_dir={tmp_path / 'a'}")
    step1 = Path("checkpoints") / "step_000001"
    shutil.copytree(tmp_path / "a" / step1, tmp_path / "b" / step1)
    shutil.copy(tmp_path / "a" / "sft_eval.json", tmp_path / "b" / "sft_eval.json")
    torchrun(2, "train", *config, "--resume", *run, f"run_dir={tmp_path / 'b'}")
    a, b = (policy_weights(tmp_path / r / "checkpoints" / "step_000002") for r in ("a", "b"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "checkpoints" / "step_000002" / "policy")


def test_global_batch_sizes_must_divide_by_the_world_size():
    assert per_rank("rollout.n_prompts", 8, 2) == 4
    with pytest.raises(ValueError, match="rollout.n_prompts=6"):
        per_rank("rollout.n_prompts", 6, 4)


def test_cuda_arch_list_letters_are_stripped_for_deepspeed_builds():
    env = {"TORCH_CUDA_ARCH_LIST": "8.0;9.0a;10.0+PTX"}
    sanitize_cuda_arch_list(env)
    assert env["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;10.0+PTX"


def test_one_process_zero2_turns_off_gradient_communication_machinery():
    zero = lambda name, n: deepspeed_config(name, 1e-6, 0.0, 1.0, True, processes=n)["zero_optimization"]
    assert not zero("zero2", 1)["overlap_comm"] and not zero("zero2", 1)["contiguous_gradients"]
    assert zero("zero2", 2)["overlap_comm"] and zero("zero2", 2)["contiguous_gradients"]  # the file's values
    assert zero("zero3", 1) == zero("zero3", 2)



def test_more_local_ranks_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match=r"rank 1 has LOCAL_RANK=1 but this node shows 1 CUDA device.*nproc_per_node"):
        init_distributed("auto")
