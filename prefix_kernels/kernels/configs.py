"""The launch policy of the Triton kernels: block sizes per kernel, from one small function of
(head dim, dtype, GPU capability), and the chunking of the prefix-gradient reduction.

``kernel_configs`` is what every launcher asks; ``override_configs`` replaces some of its answers
within a ``with`` block (the block-size sweep benchmarks/tune_blocks.py and the tests use it, not
patched module globals). The decode kernel's configs and split count live in kernels/decode.py.

The numbers for sm_80/sm_90 follow the Triton fused-attention tutorial and flash-attention's
choices for these head dims; they are starting points, not autotuned results. Under the CPU
interpreter (``capability=None``) the blocks are as large as the shapes allow, because the
interpreter's cost is per block iteration.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
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
    dq: BlockConfig  # block_m: the backward prologue/epilogue tiles; the deterministic dq pass (its block_n too)
    backward: BlockConfig  # the one-pass backward: block_n keys per program, block_m queries per tile


def head_dim_padded(head_dim: int) -> int:
    """tl.arange needs a power of two, tl.dot at least 16."""
    return max(16, 1 << (head_dim - 1).bit_length())


_OVERRIDES: dict[str, BlockConfig] = {}


def kernel_configs(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None) -> KernelConfigs:
    """Block configs for the forward, the backward and the deterministic dq pass.
    ``capability=None``: the CPU interpreter. Honours ``override_configs``."""
    configs = _default_configs(head_dim, dtype, capability)
    return replace(configs, **_OVERRIDES) if _OVERRIDES else configs


@contextmanager
def override_configs(**fields: BlockConfig):
    """``with override_configs(backward=BlockConfig(32, 128, 8, 3)): ...`` -- every launch inside
    uses these configs for the named kernels (``forward``, ``dq``, ``backward``), whatever the shape."""
    unknown = set(fields) - set(KernelConfigs.__dataclass_fields__)
    if unknown:
        raise ValueError(f"override_configs: unknown kernel(s) {sorted(unknown)}; known: "
                         f"{sorted(KernelConfigs.__dataclass_fields__)}")
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(fields)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


@lru_cache(maxsize=None)  # called on every launch: host time matters
def _default_configs(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None) -> KernelConfigs:
    d = head_dim_padded(head_dim)
    if capability is None:
        big = BlockConfig(64, 64)
        return KernelConfigs(forward=big, dq=big, backward=big)
    if dtype == torch.float64:
        small = BlockConfig(16, 16, num_warps=4, num_stages=1)  # fp64 runs on FMA units (kernels.forward.mm)
        return KernelConfigs(forward=small, dq=small, backward=small)
    # (forward, dq, backward) for 16-bit inputs; dq wants tall query tiles, the backward wide key tiles
    # (its dk/dv accumulators live in registers: 2 * block_n * D fp32 over 32 * num_warps threads).
    # The backward's were chosen statically (prefix-kernels inspect, sm_90, Triton 3.9, bf16): at D=64
    # (32, 128, 8 warps, 3 stages) is the one candidate with wgmma and no spill (244 registers); at
    # D=128 none has both: (16, 64, 8, 2) keeps wgmma with 48 B of spill, (16, 32, 4, 3) spills nothing
    # but runs mma.sync only. Not timed on a GPU yet: tune_blocks.py decides.
    if d <= 64:
        table = (BlockConfig(128, 64, 4, 3), BlockConfig(128, 32, 4, 3), BlockConfig(32, 128, 8, 3))
    elif d <= 128:
        table = (BlockConfig(128, 64, 8, 3), BlockConfig(128, 32, 8, 2), BlockConfig(16, 64, 8, 2))
    else:
        table = (BlockConfig(64, 32, 8, 2), BlockConfig(64, 32, 8, 1), BlockConfig(16, 32, 4, 1))
    if dtype == torch.float32:  # 4-byte tiles: halve the long side to stay within registers/smem
        table = tuple(
            BlockConfig(c.block_m // 2 if c.block_m >= c.block_n else c.block_m,
                        c.block_n // 2 if c.block_n > c.block_m else c.block_n, c.num_warps, c.num_stages)
            for c in table
        )
    if capability < (8, 0):
        table = tuple(BlockConfig(c.block_m, c.block_n, c.num_warps, min(c.num_stages, 2)) for c in table)
    return KernelConfigs(*table)


# Upper bound on the fp32 partial buffer of the deterministic prefix-gradient reduction.
PARTIALS_BYTES = 256 * 2**20


def prefix_grad_chunks(n_items: int, n_tiles: int, n_sms: int, heaviest_program_items: int,
                       partial_bytes_per_chunk: int) -> int:
    """How many chunks the backward cuts the prefix reduction into, per (prefix block, kv head) tile.

    ``n_items`` work items (row, query head, query block) per tile. Alongside sequence programs
    (``heaviest_program_items`` > 0: the most query tiles any of them walks), a chunk gets no more
    items than that program, so prefix programs, scheduled first, never finish last. Alone, enough
    chunks for ~4 waves of programs. Deterministic partials (``partial_bytes_per_chunk`` > 0) stay
    within PARTIALS_BYTES. No chunk is empty.
    """
    if heaviest_program_items > 0:
        chunks = -(-n_items // heaviest_program_items)
    else:
        chunks = max(1, -(-4 * n_sms // max(n_tiles, 1)))
    if partial_bytes_per_chunk:
        chunks = min(chunks, max(1, PARTIALS_BYTES // partial_bytes_per_chunk))
    chunks = max(1, min(chunks, n_items))
    return -(-n_items // -(-n_items // chunks))  # no empty chunk
