"""Test setup: without CUDA the Triton kernels run under the interpreter (set before any import of
triton-using modules). Nothing here initializes CUDA."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
