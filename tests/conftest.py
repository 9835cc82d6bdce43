"""Without a GPU, Triton kernels run in Triton's CPU interpreter; it is chosen when a kernel is
defined, so before any test imports one."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
