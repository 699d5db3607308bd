"""The launch policy of the Triton kernels: block sizes per kernel, from one small function of
(head dim, dtype, GPU capability), and the chunking of the prefix-gradient reduction.

``kernel_configs`` is what every launcher asks; ``override_configs`` replaces some of its answers
within a ``with`` block (the block-size sweep benchmarks/tune_blocks.py and the tests use it, not
patched module globals). The decode path (kernels/decode.py) has its own: when a call takes it
(``use_decode_kernel``), its block config (``decode_config``, overridable as ``decode=``) and its
split count (``decode_num_splits``).

The numbers for sm_80/sm_90 follow the Triton fused-attention tutorial and flash-attention's
choices for these head dims; they are starting points, not autotuned results. Under the CPU
interpreter (``capability=None``) the blocks are as large as the shapes allow, because the
interpreter's cost is per block iteration.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import triton


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


_KERNELS = tuple(KernelConfigs.__dataclass_fields__)  # forward, dq, backward
_OVERRIDES: dict = {}  # kernel name -> config, set by override_configs


def kernel_configs(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None,
                   windowed: bool = False) -> KernelConfigs:
    """Block configs for the forward, the backward and the deterministic dq pass.
    ``capability=None``: the CPU interpreter; ``windowed``: with a sliding window (one more masked
    loop in the forward). Honours ``override_configs``."""
    configs = _default_configs(head_dim, dtype, capability, windowed)
    if not _OVERRIDES:
        return configs
    return replace(configs, **{k: v for k, v in _OVERRIDES.items() if k in _KERNELS})


def overrides_key() -> tuple:
    """The active overrides as a hashable key (the launch plans are cached per key)."""
    return tuple(sorted(_OVERRIDES.items())) if _OVERRIDES else ()


@contextmanager
def override_configs(**fields):
    """``with override_configs(backward=BlockConfig(32, 128, 8, 3)): ...`` -- every launch inside
    uses these configs for the named kernels (``forward``, ``dq``, ``backward``: a BlockConfig;
    ``decode``: a DecodeConfig), whatever the shape; ``shared_prefix_decode=True/False`` forces the
    decode cascade on or off (``use_shared_prefix_decode``); ``decode_kernel=False`` keeps every
    forward on the general kernel (``use_decode_kernel``; True cannot force it where it does not apply)."""
    known = (*_KERNELS, "decode", "shared_prefix_decode", "decode_kernel")
    unknown = set(fields) - set(known)
    if unknown:
        raise ValueError(f"override_configs: unknown kernel(s) {sorted(unknown)}; known: {sorted(known)}")
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(fields)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def _sixteen_bit_table(d: int, windowed: bool) -> tuple[BlockConfig, BlockConfig, BlockConfig]:
    """The (forward, dq, backward) block configs for 16-bit inputs at padded head dim d. Chosen statically
    (prefix-kernels inspect, sm_90, Triton 3.9, bf16; the hot-loop model of perf_model.py;
    benchmarks/results/inspect_sm90_*_v3_{before,after}.json).
    backward: (block_m, block_n) = (queries, keys) of the dk/dv tiles of a sequence/prefix program, whose
    dk/dv accumulators live in registers (2 * block_n * D fp32 over 32 * num_warps threads); its dq tiles
    are the transpose, block_n queries x block_m keys (kernels/backward.py). 128 keys over 8 warps give
    every matmul m64 wgmmas on both warpgroups with no duplicated work; the query side is as wide as the
    registers allow with no spill in a hot loop (useful FLOPs per loop kind: 4 matmuls in a dk/dv loop, 3
    in a dq loop; perf_model credits every backward_kernel loop with all 5, i.e. 1.25x / 1.67x fewer
    instructions per FLOP than these):
      D=64:  (64, 128, 8, 2): 248 registers (255 with window + softcap + sinks), no spill; every wgmma
             m64n64; unmasked loops 841 (dk/dv) / 786 (dq) warp-instructions per useful MFLOP, issue/tensor
             0.86 / 0.81, smem/tensor 0.75 / 0.83. (64, 128, 8, 3) spills 36 B in the dk/dv loop;
             (32, 128, 8, 3) fits (243) but its n32 tiles cost ~25% more instructions per FLOP.
      D=128: (32, 128, 8, 2): 250 registers (255), no spill; m64n32 + m64n128 wgmma; 649 / 654 per MFLOP,
             issue/tensor 0.66 / 0.67, smem/tensor 1.0 / 1.17. block_m = 64 spills in the loops (128 fp32
             dk/dv registers per thread leave no room for 64-wide S/dP tiles), 4 warps likewise.
    The one-pass kernel with dq atomics from 16-query tiles (16, 64 / 128, 8, 3) made both warpgroups compute
    the same S^T (m64n8 / n16 wgmma) at 2.7x the instructions per FLOP of these; it needed block_m = 16 to
    hold the [D, block_m] dq^T tile next to dk/dv.
    dq: the tiles of the backward's prologue/epilogue and the deterministic dq pass (tall query tiles):
    64 keys per step, m64n64 wgmma on both warpgroups: D=64 (128, 64, 8, 3) 138 registers (220 with the
    features), 786 warp-instructions per useful MFLOP, smem/tensor 0.83, where (128, 32, 4, 3) gave 799 and
    1.17; D=128 (128, 64, 8, 2) 233 (254), 468 and 0.83, where (128, 32, 8, 2) gave 659 and 1.17; no spill
    (benchmarks/results/blocks_model.json).
    A sliding window adds the window-edge loop to the forward: at D=128 (128, 64, 8, 3) then spills
    20 B, (128, 32, 8, 3) needs 204 registers.
    The forward at D=64 (the merged prefix + sequence loop, kernels/forward.py): (128, 128, 8, 3), 198
    registers (234 with window + softcap + sinks), 112 KB, 1 block (8 warps) per SM: the softmax of a
    128 x 128 tile amortizes the loop's fixed cost (addresses, barriers, waits) over twice the FLOPs of
    128 x 64 (2 blocks of 8 warps, 116 registers): issue/tensor 1.38 -> 1.10, and 0.98 with the row max
    taken before the scale (tiles.online_softmax_step_scaled). (128, 64, 4, 3) needs 255 registers
    and issues more per FLOP (1.20). With a sliding window (its edge loop) on top of a prefix bank,
    padding, softcap and sinks, (128, 128) spills 72 B: windowed launches keep (128, 64, 8, 3), which
    fits them all. At D=128 BLOCK_N = 128 spills (16 B with the separate loops, 60 B merged).
    """
    if d <= 64:
        forward = BlockConfig(128, 64, 8, 3) if windowed else BlockConfig(128, 128, 8, 3)
        return (forward, BlockConfig(128, 64, 8, 3), BlockConfig(64, 128, 8, 2))
    if d <= 128:
        forward = BlockConfig(128, 32, 8, 3) if windowed else BlockConfig(128, 64, 8, 3)
        return (forward, BlockConfig(128, 64, 8, 2), BlockConfig(32, 128, 8, 2))
    return (BlockConfig(64, 32, 8, 2), BlockConfig(64, 32, 8, 1), BlockConfig(16, 32, 4, 1))


@lru_cache(maxsize=None)  # called on every launch: host time matters
def _default_configs(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None,
                     windowed: bool = False) -> KernelConfigs:
    d = head_dim_padded(head_dim)
    if capability is None:
        big = BlockConfig(64, 64)
        return KernelConfigs(forward=big, dq=big, backward=big)
    if dtype == torch.float64:
        small = BlockConfig(16, 16, num_warps=4, num_stages=1)  # fp64 runs on FMA units (kernels.forward.mm)
        return KernelConfigs(forward=small, dq=small, backward=small)
    table = _sixteen_bit_table(d, windowed)
    if dtype == torch.float32:  # 4-byte tiles: halve the long side (both of a square) to stay within registers/smem
        table = tuple(
            BlockConfig(c.block_m // 2 if c.block_m >= c.block_n else c.block_m,
                        c.block_n // 2 if c.block_n >= c.block_m else c.block_n, c.num_warps, c.num_stages)
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


# ---------------------------------------------------------------- the decode path (kernels/decode.py)

# The split-KV decode kernel takes the forward when N * G (query, head) pairs per kv head fit in this
# many tile rows. Up to 64 rows its tile is at most half of the general kernel's BLOCK_M = 128 (D <=
# 128, 16-bit), so the general kernel would leave at least half of every tile empty and read each
# group's K/V G times; acc [64, D] fp32 still fits the registers of 4 warps for D <= 128. Past 64
# rows the general tiles are well filled, and the split partials (splits x D fp32 per row, written
# and read back) grow with N * G. fp64 stays on the general kernel (no fp64 partials/configs here).
# And only for decode-like calls, N <= DECODE_MAX_QUERIES (generation, short speculative chunks):
# neither kernel has been timed on a GPU against the other yet, so the general kernel keeps every
# prefill/training shape (and its small-N code paths keep their tests).
DECODE_MAX_ROWS = 64
DECODE_MAX_QUERIES = 4


def use_decode_kernel(n_queries: int, group: int, dtype: torch.dtype) -> bool:
    """Whether a forward of N = ``n_queries`` queries per row and ``group`` query heads per kv head
    takes the split-KV decode kernel (see DECODE_MAX_ROWS); ``override_configs(decode_kernel=False)``
    turns it off."""
    if _OVERRIDES.get("decode_kernel") is False:
        return False
    return dtype != torch.float64 and n_queries <= DECODE_MAX_QUERIES and n_queries * group <= DECODE_MAX_ROWS


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # keys per tile
    min_keys_per_split: int  # a split gets at least this many keys (partials cost S * D per row)
    max_splits: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # Programs of the split kernel that fit on one SM at once, for the wave count. sm_90 bf16 D=128 at
    # 4 warps: 134 registers, 70 KB of shared memory -> 3 (prefix-kernels inspect, Triton 3.9).
    resident_per_sm: int = 3


def decode_block_rows(n_rows: int) -> int:
    """Tile rows for N * G (query, head) pairs: a power of two, at least 16 for tl.dot."""
    return max(16, triton.next_power_of_2(n_rows))


def decode_config(head_dim_pad: int, itemsize: int, block_rows: int,
                  capability: tuple[int, int] | None) -> DecodeConfig:
    """Block config of the split kernel; honours ``override_configs(decode=...)``."""
    return _OVERRIDES.get("decode") or _default_decode_config(head_dim_pad, itemsize, block_rows, capability)


@lru_cache(maxsize=None)  # called on every launch: host time matters
def _default_decode_config(head_dim_pad: int, itemsize: int, block_rows: int,
                  capability: tuple[int, int] | None) -> DecodeConfig:
    """Block config of the split kernel. ``capability=None``: the interpreter, whose cost is per
    block iteration: one 64-key block, splits of >= 64 keys. CUDA: unmeasured starting points."""
    if capability is None:
        return DecodeConfig(block_n=64, min_keys_per_split=64, max_splits=8, num_warps=1, num_stages=1, resident_per_sm=4)
    # 16-bit K/V tiles: 128 x 64, 64 x 128 or 32 x 256 (16 KB each); fp32 halves the keys.
    block_n = {16: 128, 32: 128, 64: 128, 128: 64}.get(head_dim_pad, 32)
    if itemsize >= 4:
        block_n //= 2
    stages = 3 if head_dim_pad <= 128 else 2
    if capability < (8, 0):
        stages = min(stages, 2)
    # acc [rows, D] fp32 lives in registers: 8 warps past 64 x 128.
    warps = 8 if block_rows * head_dim_pad > 64 * 128 else 4
    return DecodeConfig(block_n=block_n, min_keys_per_split=256, num_warps=warps, num_stages=stages)


def decode_num_splits(n_keys_total: int, n_programs: int, n_sms: int, cfg: DecodeConfig) -> tuple[int, int]:
    """(num_splits, keys_per_split) for ``n_programs`` = B * Hkv programs per split over
    ``n_keys_total`` = P + M keys. The grid should fill whole waves of ``n_sms * resident_per_sm``
    programs: the fewest splits whose last wave is at least 90% full (e.g. B=64, Hkv=8 on 132 SMs:
    3 splits = 3.9 waves, where 2 gave 2.6), else the fullest; each split at least
    ``cfg.min_keys_per_split`` keys, at most ``cfg.max_splits``; keys_per_split is a multiple of
    BLOCK_N and no split is empty."""
    if n_keys_total <= 0:
        return 1, cfg.block_n
    slots = max(n_sms * cfg.resident_per_sm, 1)
    most = max(1, min(cfg.max_splits, n_keys_total // cfg.min_keys_per_split))

    def split(wanted: int) -> tuple[int, int]:  # whole blocks per split; rounding may drop a split
        per_split = triton.cdiv(triton.cdiv(n_keys_total, wanted), cfg.block_n) * cfg.block_n
        return triton.cdiv(n_keys_total, per_split), per_split

    def fill(choice: tuple[int, int]) -> float:  # fraction of the launched waves' slots that do work
        waves = n_programs * choice[0] / slots
        return waves / math.ceil(waves)

    choices = [split(wanted) for wanted in range(1, most + 1)]
    return next((c for c in choices if fill(c) >= 0.9), None) or max(choices, key=fill)


# The decode cascade (kernels/decode.py, kernel 3): with one prefix shared by every row, the prefix
# part runs once per kv head as a product of ALL rows' queries (tiles of SHARED_PREFIX_BLOCK_ROWS
# stacked (row, head, query) rows) against the prefix, instead of once per row. Cost model, in keys
# read per kv head (K and V of one key cost the same on both paths):
#   per row:  B * (P + M)
#   cascade:  ceil(B * G * N / BLOCK_ROWS) * P + B * M, plus the prefix splits' partials, written once
#             and read once by the combine: B * G * N * S_p * (Dv + 2) fp32, about
#             B * G * N * S_p * 2 * (Dv + 2) * 4 / (2 * D * itemsize) key-equivalents.
# The cascade is taken when it reads at most CASCADE_MAX_FRACTION of the per-row path's bytes.
#
# A bank of T prefixes with prefix_ids: a tile holds rows of ONE prefix (the kernel finds them on the
# device, ``decode.bank_rows``: no sort, no host sync, so CUDA graphs keep working). The host does
# not know how the B rows spread over the T prefixes, so the grid has T * ceil(B * G * N / BLOCK_ROWS)
# tiles per kv head (any prefix may hold every row) and a tile past its prefix's rows returns at once.
# Prefix t with c_t rows fills ceil(c_t * G * N / BLOCK_ROWS) tiles, and since ceil(a) + ceil(b) <=
# ceil(a + b) + 1, the U <= min(T, B) prefixes in use fill at most
#   tiles_bank = ceil(B * G * N / BLOCK_ROWS) + min(T, B) - 1
# tiles that read the prefix (``shared_prefix_tiles``; the model takes this worst case, the split
# count too). The bank's cascade then costs tiles_bank * P + B * M + partials, plus every launched
# program reading the B prefix ids (8 bytes each: T * tiles * S_p * B * 8 / (2 * D * itemsize) key
# equivalents, mostly L2 hits; it also stands for the empty programs' launch cost). With M << P the
# cascade wins while tiles_bank <= 0.75 * B, i.e. T <= 0.75 * B + 1 - ceil(B * G * N / BLOCK_ROWS):
# few prefixes with long P take it, T close to B (no sharing) never does. E.g. B=64, G=4, N=1, D=128,
# bf16, M=64, P=4096, S_p=8: cascade up to T=43 (T=4: 7 tiles read P, 0.14 of the per-row bytes);
# P=512, M=512: up to T=19; G*N=16: T<=27, G*N=32: T<=8; G*N=64 (a row's own tile is full): never,
# whatever T. A bank of one (T=1) is one shared prefix. Not timed on a GPU yet.
SHARED_PREFIX_BLOCK_ROWS = 64
CASCADE_MAX_FRACTION = 0.75
SHARED_PREFIX_MAX_TILES = 65535  # CUDA's limit on grid axis 2, which carries the (prefix, tile) pairs
# sm_90 bf16 D=128, 64 rows, 4 warps, 3 stages: 212 registers, 112 KB of shared memory -> 2 programs
# per SM (prefix-kernels inspect, Triton 3.9); the prefix split count fills waves of that many.
SHARED_PREFIX_RESIDENT_PER_SM = 2


def shared_prefix_block_rows(capability: tuple[int, int] | None) -> int:
    return 16 if capability is None else SHARED_PREFIX_BLOCK_ROWS


def shared_prefix_config(cfg: DecodeConfig, capability: tuple[int, int] | None) -> DecodeConfig:
    """The decode config with the cascade kernel's occupancy (for its split count)."""
    return cfg if capability is None else replace(cfg, resident_per_sm=SHARED_PREFIX_RESIDENT_PER_SM)


def shared_prefix_tiles(batch: int, rows_per_batch_row: int, block_rows: int, n_prefixes: int = 1) -> tuple[int, int]:
    """(tiles per prefix, tiles that can read the prefix) per kv head, for B = ``batch`` rows of G * N =
    ``rows_per_batch_row`` stacked rows each and a bank of ``n_prefixes`` (1: one shared prefix).
    The cascade launches n_prefixes * tiles-per-prefix tiles per kv head; see tiles_bank above."""
    tiles = -(-batch * rows_per_batch_row // block_rows)
    if n_prefixes <= 1:
        return tiles, tiles
    return tiles, min(n_prefixes * tiles, tiles + min(n_prefixes, batch) - 1)


def use_shared_prefix_decode(batch: int, rows_per_batch_row: int, n_prefix: int, n_keys: int, head_dim: int,
                             head_dim_v: int, itemsize: int, prefix_splits: int, block_rows: int,
                             n_prefixes: int = 1) -> bool:
    """Whether a decode call reads its prefix through the cascade (the cost model above);
    ``n_prefixes``: T of a bank chosen by prefix_ids (1: one prefix shared by every row).
    ``override_configs(shared_prefix_decode=...)`` decides instead when set (within the grid limit)."""
    tiles, tiles_bank = shared_prefix_tiles(batch, rows_per_batch_row, block_rows, n_prefixes)
    if n_prefix == 0 or max(n_prefixes, 1) * tiles > SHARED_PREFIX_MAX_TILES:
        return False
    forced = _OVERRIDES.get("shared_prefix_decode")
    if forced is not None:
        return bool(forced)
    if batch < 2:
        return False
    rows = batch * rows_per_batch_row
    key_bytes = 2 * head_dim * itemsize
    per_row = batch * (n_prefix + n_keys)
    partials = rows * prefix_splits * 2 * (head_dim_v + 2) * 4 / key_bytes
    scan = n_prefixes * tiles * prefix_splits * batch * 8 / key_bytes if n_prefixes > 1 else 0
    cascade = tiles_bank * n_prefix + batch * n_keys + partials + scan
    return cascade <= CASCADE_MAX_FRACTION * per_row


def combine_num_warps(block_s: int, head_dim_pad: int) -> int:
    """Warps of the combine kernel, whose program holds a [BLOCK_S, D] fp32 tile (no loop, 1 stage)."""
    return 4 if block_s * head_dim_pad <= 64 * 128 else 8
