"""Triton kernels for prefix attention (imported lazily: importing triton never touches CUDA)."""
