"""Block sizes per kernel, from one small function of (head dim, dtype, GPU capability).

The numbers for sm_80/sm_90 follow the Triton fused-attention tutorial and flash-attention's
choices for these head dims; they are starting points, not autotuned results. Under the CPU
interpreter (``capability=None``) the blocks are as large as the shapes allow, because the
interpreter's cost is per block iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class BlockConfig:
    block_m: int  # queries per tile
    block_n: int  # keys (sequence or prefix) per tile
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class KernelConfigs:
    forward: BlockConfig
    dq: BlockConfig  # one program per query block, loops over keys
    dkdv: BlockConfig  # one program per key block, loops over queries (sequence and prefix keys)


def head_dim_padded(head_dim: int) -> int:
    """tl.arange needs a power of two, tl.dot at least 16."""
    return max(16, 1 << (head_dim - 1).bit_length())


@lru_cache(maxsize=None)  # called on every launch: host time matters
def kernel_configs(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None) -> KernelConfigs:
    """Block sizes for the forward, dq and dk/dv kernels. ``capability=None``: the interpreter."""
    d = head_dim_padded(head_dim)
    if capability is None:
        big = BlockConfig(64, 64)
        return KernelConfigs(forward=big, dq=big, dkdv=big)
    if dtype == torch.float64:
        small = BlockConfig(16, 16, num_warps=4, num_stages=1)  # fp64 runs on FMA units (kernels.forward.mm)
        return KernelConfigs(forward=small, dq=small, dkdv=small)
    # (forward, dq, dkdv) for 16-bit inputs; dq wants tall query tiles, dk/dv wide key tiles.
    if d <= 64:
        table = (BlockConfig(128, 64, 4, 3), BlockConfig(128, 32, 4, 3), BlockConfig(32, 128, 4, 3))
    elif d <= 128:
        table = (BlockConfig(128, 64, 8, 3), BlockConfig(128, 32, 8, 2), BlockConfig(32, 128, 8, 2))
    else:
        table = (BlockConfig(64, 32, 8, 2), BlockConfig(64, 32, 8, 1), BlockConfig(32, 64, 8, 1))
    if dtype == torch.float32:  # 4-byte tiles: halve the long side to stay within registers/smem
        table = tuple(
            BlockConfig(c.block_m // 2 if c.block_m >= c.block_n else c.block_m,
                        c.block_n // 2 if c.block_n > c.block_m else c.block_n, c.num_warps, c.num_stages)
            for c in table
        )
    if capability < (8, 0):
        table = tuple(BlockConfig(c.block_m, c.block_n, c.num_warps, min(c.num_stages, 2)) for c in table)
    return KernelConfigs(*table)
