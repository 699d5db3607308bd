"""FLOPs and bytes of one attention call, the numerators of the benchmark's TFLOPS and GB/s.

FLOPs (stored per row as ``flops``), flash-attention's convention (two matmuls, 2 FLOPs per MAC,
only visible keys counted)::

    fwd     = 4 * B * Hq * D * (N * P + sum over queries of the visible sequence keys)
            = 4 * B * Hq * D * (N * P + N * (M - N) + N * (N + 1) / 2)      (causal, bottom-right)
    bwd     = 2.5 * fwd
    fwd+bwd = 3.5 * fwd
    decode  = fwd with N = 1, i.e. 4 * B * Hq * D * (P + M)

Query i (at position M - N + i) sees M - N + i + 1 sequence keys; with a sliding window W,
min(W, M - N + i + 1) -- the prefix's P keys always. The count is the same for every provider,
including those that compute the masked scores anyway (SDPA with an explicit mask): their TFLOPS
are useful work per second.

TFLOPS = flops / time. Decode rows also give GB/s = bytes / time with
``bytes = 2 * (B * Hkv * min(M, W) + Hkv * P) * D * element_size`` (K and V of the visible cache
plus the shared prefix, each read once; q and the output are negligible).
"""

from __future__ import annotations

import torch

from prefix_kernels.benchmarking.shapes import Shape


def flops(shape: Shape, mode: str) -> float:
    """FLOPs of one call (see the module docstring)."""
    n, m, w = shape.N, shape.M, shape.W
    if w is None:
        visible = n * (m - n) + n * (n + 1) // 2  # causal, bottom-right: query i sees M - N + i + 1 keys
    else:
        visible = sum(min(w, m - n + i + 1) for i in range(n))
    fwd = 4 * shape.B * shape.Hq * shape.D * (n * shape.P + visible)
    return float({"fwd": fwd, "decode": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode])


def kv_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes of K/V read by a decode step: the visible cache and the shared prefix, once each."""
    size = torch.empty((), dtype=dtype).element_size()
    cache = shape.M if shape.W is None else min(shape.M, shape.W)
    return 2 * (shape.B * shape.Hkv * cache + shape.Hkv * shape.P) * shape.D * size
