"""The launch plan: what a forward, a decode forward or a backward will launch, decided once per call.

A plan is a pure function of the call's shapes, dtype, features, needed gradients and the GPU
(:class:`DeviceProps`: capability and SM count, passed in, never looked up here): every block
config, grid, split and chunk count, the cascade choice, the buffers to allocate and every
non-tensor kernel argument. ``ops`` turns a plan into launches: it allocates what the plan lists
and hands each kernel its tensors, their strides and the plan's arguments; it decides nothing.
``prefix-kernels inspect`` prints the plans it compiled (:func:`describe`).

Plans are frozen and cached per distinct call (host time: a cached plan costs one dictionary
lookup); ``configs.override_configs`` is part of the cache key, so an override changes the plan's
fields and nothing else. Each kernel launch of a plan is a :class:`Launch`: its grid, its
non-tensor arguments by name (scalars and constexprs) and its compile options (num_warps /
num_stages; none under the interpreter).

Where a new score or mask term goes: one field of :class:`ScoreTerms` (what the call asks for), one
field of :class:`ScoreArgs` (what the kernels take, filled in :meth:`ScoreTerms.kernel_arg`: a scalar,
an UPPER-CASE ``tl.constexpr`` flag, or a tensor the launcher fills in as it does ``sinks``), and its
code in kernels/tiles.py: ``key_tile_scores`` for a term of the score, ``mask_scores`` (under
``SEQ_MASKS``) and ``key_ranges`` / ``query_ranges`` for a mask. The kernels pass ``terms`` whole.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple, Optional, Union

import torch
import triton.language as tl

from prefix_kernels.kernels.configs import (
    BlockConfig, DecodeConfig, combine_num_warps, decode_block_rows, decode_config, decode_num_splits,
    head_dim_padded, kernel_configs, overrides_key, prefix_grad_chunks, shared_prefix_block_rows,
    shared_prefix_config, shared_prefix_tiles, use_decode_kernel, use_shared_prefix_decode,
)

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DeviceProps:
    """What the plan needs to know of the device: ``capability`` (None: the CPU interpreter, or no
    GPU) and the SM count; ``interpreted``: the kernels run in Triton's interpreter (no compile
    options, 16-bit tiles upcast for tl.dot)."""

    capability: Optional[tuple[int, int]]
    num_sms: int
    interpreted: bool = False


INTERPRETER = DeviceProps(capability=None, num_sms=2, interpreted=True)
SM80 = DeviceProps(capability=(8, 0), num_sms=108)  # A100
SM90 = DeviceProps(capability=(9, 0), num_sms=132)  # H100 SXM


def _frozen(**kwargs) -> Mapping:
    return MappingProxyType(kwargs)


class ScoreArgs(NamedTuple):
    """The score terms as the attention kernels take them: one argument, ``terms`` (a tuple: Triton
    specializes each element as it does a scalar argument, and each ``tl.constexpr`` value compiles its
    own kernel). ``softcap2``: the softcap in log2 units (c * log2(e)); ``window``: the sliding window
    in keys; ``sinks``: the [Hq] sink logits (the launcher's tensor; None in a plan); WINDOW_MASK: 0
    none, 1 causal window, 2 two-sided; SOFTCAP / HAS_SINKS: the terms are on."""

    softcap2: float
    window: int
    sinks: Any
    WINDOW_MASK: tl.constexpr
    SOFTCAP: tl.constexpr
    HAS_SINKS: tl.constexpr


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](<tensors and strides>, **args, **options)``, plus
    ``terms=`` (:class:`ScoreArgs`, the sink tensor filled in) for the attention kernels."""

    grid: tuple
    args: Mapping  # scalars and constexprs, by name
    options: Mapping  # num_warps / num_stages (empty under the interpreter)
    terms: Optional[ScoreArgs] = None


@dataclass(frozen=True)
class ScoreTerms:
    """How a score is formed and which keys a query sees, beyond the causal mask, the padding mask
    and the prefix bank: one field per term. ``sinks``: per-head sink logits are given."""

    causal: bool
    sliding_window: Optional[int] = None
    softcap: Optional[float] = None
    sinks: bool = False

    def kernel_arg(self, sinks: bool = True) -> ScoreArgs:
        """The kernels' ``terms`` (kernels/tiles.py), without the sink tensor (the launcher's);
        ``sinks=False``: a launch that does not read the sinks."""
        window = self.sliding_window
        return ScoreArgs(softcap2=1.0 if self.softcap is None and window is None else
                         (1.0 if self.softcap is None else self.softcap) * LOG2E,
                         window=0 if window is None else window, sinks=None,
                         WINDOW_MASK=tl.constexpr(0 if window is None else (1 if self.causal else 2)),
                         SOFTCAP=tl.constexpr(self.softcap is not None),
                         HAS_SINKS=tl.constexpr(self.sinks and sinks))


@dataclass(frozen=True)
class Problem:
    """The shapes of one call: q [B, Hq, N, D], k [B, Hkv, M, D], v [.., Dv], prefixes [T, Hkv, P, D],
    all in ``dtype``; ``has_mask``: a key padding mask; ``has_ids``: a bank chosen by prefix_ids."""

    batch: int
    n_heads: int
    n_kv_heads: int
    n_queries: int
    n_keys: int
    n_prefix: int
    n_prefixes: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    has_mask: bool
    has_ids: bool
    scale: float
    terms: ScoreTerms

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def dims(self) -> dict:
        return dict(HEAD_DIM=self.head_dim, HEAD_DIM_PAD=head_dim_padded(self.head_dim), HEAD_DIM_V=self.head_dim_v,
                    HEAD_DIM_V_PAD=head_dim_padded(self.head_dim_v))

    def features(self) -> dict:
        """The flags of the key sources every attention kernel takes."""
        return dict(IS_CAUSAL=self.terms.causal, HAS_KPM=self.has_mask, HAS_PREFIX_IDS=self.has_ids)


def dtype_flags(dtype: torch.dtype, device: DeviceProps) -> dict:
    """UPCAST: the interpreter cannot tl.dot 16-bit floats, so compute in fp32 there.
    PRECISION "fma": fp64 products without tl.dot (see kernels.tiles.mm)."""
    return dict(
        UPCAST=device.interpreted and dtype in (torch.float16, torch.bfloat16),
        PRECISION={torch.float64: "fma", torch.float32: "ieee"}.get(dtype, "tf32"),
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
    )


def launch_options(num_warps: int, num_stages: int, device: DeviceProps) -> Mapping:
    return _frozen() if device.interpreted else _frozen(num_warps=num_warps, num_stages=num_stages)


def elementwise_options(tile_elems: int, device: DeviceProps) -> Mapping:
    """The backward's prologue/epilogue (loads, a row reduction, stores; no matmul): 8 warps for
    [128, 128] tiles (4 spill there), else 4."""
    return launch_options(8 if tile_elems >= 128 * 128 else 4, 1, device)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


# ---------------------------------------------------------------- the forward

@dataclass(frozen=True)
class ForwardPlan:
    """The general forward (kernels/forward.py): one program per (query block, row, query head)."""

    block: BlockConfig
    forward: Launch


def plan_forward(problem: Problem, device: DeviceProps) -> Union[ForwardPlan, "DecodePlan"]:
    """The forward's plan: the split-KV decode path (:class:`DecodePlan`) for few queries per row
    (``configs.use_decode_kernel``), else :class:`ForwardPlan`. Honours ``override_configs``."""
    return _plan_forward(problem, device, overrides_key())


@lru_cache(maxsize=1024)
def _plan_forward(problem: Problem, device: DeviceProps, overrides) -> Union[ForwardPlan, "DecodePlan"]:
    p = problem
    if use_decode_kernel(p.n_queries, p.group, p.dtype):
        return _plan_decode(p, device)
    windowed = p.terms.sliding_window is not None
    cfg = kernel_configs(max(p.head_dim, p.head_dim_v), p.dtype, device.capability, windowed).forward
    args = _frozen(
        n_heads=p.n_heads, n_queries=p.n_queries, n_keys=p.n_keys, n_prefix=p.n_prefix, group=p.group,
        qk_scale=p.scale * LOG2E, **p.dims(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **p.features(),
        **dtype_flags(p.dtype, device),
    )
    grid = (_cdiv(p.n_queries, cfg.block_m), p.batch * p.n_heads)
    return ForwardPlan(block=cfg, forward=Launch(grid, args, launch_options(cfg.num_warps, cfg.num_stages, device),
                                                 p.terms.kernel_arg()))


# ---------------------------------------------------------------- the decode forward

@dataclass(frozen=True)
class DecodePlan:
    """The split-KV decode forward (kernels/decode.py). ``cascade``: the prefix runs once per kv head
    for all rows (``shared_prefix``, the first ``split_base`` splits), the per-row kernel
    (``rows``) walks the sequence keys from ``seq_start``; else the per-row kernel walks
    [prefix | sequence]. ``splits`` > 1: fp32 partials ``partials_shape`` (+ m, l:
    ``ml_shape``) merged by ``combine``."""

    config: DecodeConfig
    block_rows: int
    cascade: bool
    splits: int
    seq_splits: int
    split_base: int
    seq_start: int
    partials_shape: Optional[tuple]
    ml_shape: Optional[tuple]
    shared_prefix: Optional[Launch]
    rows: Launch
    combine: Optional[Launch]


@dataclass(frozen=True)
class _CascadeChoice:
    block_rows: int
    tiles_per_prefix: int
    splits: int
    keys_per_split: int
    taken: bool


def _cascade_choice(p: Problem, cfg: DecodeConfig, seq_start: int, device: DeviceProps) -> Optional[_CascadeChoice]:
    """The cascade's tiles and prefix splits, and whether the cost model takes it (None: no prefix)."""
    if p.n_prefix == 0:
        return None
    n_bank = p.n_prefixes if p.has_ids else 1
    rows = shared_prefix_block_rows(device.capability)
    tiles, work_tiles = shared_prefix_tiles(p.batch, p.n_queries * p.group, rows, n_bank)
    splits, per_split = decode_num_splits(p.n_prefix, p.n_kv_heads * work_tiles, device.num_sms,
                                          shared_prefix_config(cfg, device.capability))
    taken = use_shared_prefix_decode(p.batch, p.n_queries * p.group, p.n_prefix, p.n_keys - seq_start, p.head_dim,
                                     p.head_dim_v, p.dtype.itemsize, splits, rows, n_bank)
    return _CascadeChoice(rows, tiles, splits, per_split, taken)


def _plan_decode(p: Problem, device: DeviceProps) -> DecodePlan:
    block_r = decode_block_rows(p.n_queries * p.group)
    cfg = decode_config(head_dim_padded(max(p.head_dim, p.head_dim_v)), p.dtype.itemsize, block_r, device.capability)
    window = p.terms.sliding_window
    seq_start = 0 if window is None else max(0, p.n_keys - p.n_queries - window + 1)
    cascade = _cascade_choice(p, cfg, seq_start, device)
    taken = cascade is not None and cascade.taken
    seq_keys = p.n_keys - seq_start + (0 if taken else p.n_prefix)
    seq_splits, per_split = decode_num_splits(seq_keys, p.batch * p.n_kv_heads, device.num_sms, cfg)
    base = cascade.splits if taken else 0
    splits = base + seq_splits
    flags = dtype_flags(p.dtype, device)
    common = dict(**p.dims(), UPCAST=flags["UPCAST"], PRECISION=flags["PRECISION"])
    opts = launch_options(cfg.num_warps, cfg.num_stages, device)
    rows = Launch((p.batch * p.n_kv_heads, seq_splits), _frozen(
        n_heads=p.n_heads, n_kv_heads=p.n_kv_heads, n_queries=p.n_queries, n_keys=p.n_keys,
        n_prefix=0 if taken else p.n_prefix, group=p.group, num_splits=splits, keys_per_split=per_split,
        qk_scale=p.scale * LOG2E, **common, BLOCK_R=block_r, BLOCK_N=cfg.block_n, **p.features(), SPLIT=splits > 1,
        **({"seq_start": seq_start} if seq_start else {}), **({"split_base": base} if base else {})), opts,
        p.terms.kernel_arg(sinks=not taken))  # with the cascade, the prefix kernel carries the sink
    shared = _shared_prefix_launch(p, cfg, cascade, splits, common, opts) if taken else None
    combine = _combine_launch(p, splits, device) if splits > 1 else None
    rows_shape = (p.batch, p.n_heads, p.n_queries, splits)
    return DecodePlan(config=cfg, block_rows=block_r, cascade=taken, splits=splits, seq_splits=seq_splits,
                      split_base=base, seq_start=seq_start,
                      partials_shape=(*rows_shape, p.head_dim_v) if splits > 1 else None,
                      ml_shape=(2, *rows_shape) if splits > 1 else None,
                      shared_prefix=shared, rows=rows, combine=combine)


def _shared_prefix_launch(p: Problem, cfg: DecodeConfig, cascade: _CascadeChoice, splits: int, common: dict,
                          opts: Mapping) -> Launch:
    """The cascade's prefix kernel: (kv head, prefix split, (prefix, row tile)) programs; with a bank
    of several prefixes the rows of each are found on the device (the kernel's bank arguments)."""
    n_bank = p.n_prefixes if p.has_ids else 1
    bank = {} if n_bank == 1 else dict(n_batch=p.batch, tiles_per_prefix=cascade.tiles_per_prefix,
                                       HAS_PREFIX_IDS=True, BLOCK_B=min(64, max(16, _next_power_of_2(p.batch))))
    args = _frozen(n_heads=p.n_heads, n_queries=p.n_queries, n_rows_total=p.batch * p.n_queries * p.group,
                   n_prefix=p.n_prefix, group=p.group, num_splits=splits, keys_per_split=cascade.keys_per_split,
                   qk_scale=p.scale * LOG2E, **common, BLOCK_R=cascade.block_rows, BLOCK_N=cfg.block_n, **bank)
    return Launch((p.n_kv_heads, cascade.splits, n_bank * cascade.tiles_per_prefix), args, opts, p.terms.kernel_arg())


def _combine_launch(p: Problem, splits: int, device: DeviceProps) -> Launch:
    """The combine of the splits' partials: one program per (row, query head, query); it only sees values."""
    block_s = _next_power_of_2(splits)
    dv_pad = head_dim_padded(p.head_dim_v)
    args = _frozen(n_heads=p.n_heads, n_queries=p.n_queries, num_splits=splits, HEAD_DIM=p.head_dim_v,
                   HEAD_DIM_PAD=dv_pad, BLOCK_S=block_s)
    return Launch((p.batch * p.n_heads * p.n_queries,), args,
                  launch_options(combine_num_warps(block_s, dv_pad), 1, device))


# ---------------------------------------------------------------- the backward

@dataclass(frozen=True)
class Needs:
    """The gradients a backward computes (resolved: no prefix gradient when P = 0, no sink gradient
    without sinks) and whether it must be bit-identical run to run."""

    dq: bool
    dkdv: bool
    dprefix: bool
    dsinks: bool
    deterministic: bool


@dataclass(frozen=True)
class BackwardPlan:
    """The backward (kernels/backward.py). ``dq_atomic``: dq is added into an fp32 accumulator
    (``dq_acc``: a separate buffer, else dq itself) by the main kernel, else (deterministic) stored
    by ``dq``; ``chunks``: the prefix reduction's chunks per (prefix block, kv head);
    ``prefix_acc``: how many [T, Hkv, P, D] fp32 accumulators of each prefix gradient (one per
    chunk when deterministic, 0: none); ``dsink_parts``: fp32 partials of the sink gradient;
    ``convert_dq`` / ``convert_dprefix``: the epilogue writes dq / the prefix gradients from the
    accumulators, else they are the gradients."""

    blocks: BlockConfig
    tiles: BlockConfig
    needs: Needs
    dq_atomic: bool
    dq_acc: bool
    chunks: int
    prefix_acc: int
    dsink_parts: int
    convert_dq: bool
    convert_dprefix: bool
    prologue: Launch
    dq: Optional[Launch]
    main: Optional[Launch]
    epilogue: Optional[Launch]


def plan_backward(problem: Problem, needs: Needs, device: DeviceProps) -> BackwardPlan:
    """The backward's plan (at least one gradient needed, at least one query). Honours ``override_configs``."""
    return _plan_backward(problem, needs, device, overrides_key())


@lru_cache(maxsize=1024)
def _plan_backward(p: Problem, needs: Needs, device: DeviceProps, overrides) -> BackwardPlan:
    configs = kernel_configs(max(p.head_dim, p.head_dim_v), p.dtype, device.capability)
    cfg, tile = configs.backward, configs.dq
    acc_is_dtype = p.dtype in (torch.float32, torch.float64)  # the fp32/fp64 accumulators are the gradients
    dq_atomic = needs.dq and not needs.deterministic
    main, chunks = _main_launch(p, needs, cfg, device)
    prefix_acc = (chunks if needs.deterministic else 1) if needs.dprefix else 0
    prologue = _prologue_launch(p, needs, tile, prefix_acc, device)
    convert_dq = dq_atomic and not acc_is_dtype
    convert_dprefix = needs.dprefix and (needs.deterministic or not acc_is_dtype)
    dq = None
    if needs.dq and needs.deterministic:
        dq = Launch((_cdiv(p.n_queries, tile.block_m), p.batch * p.n_heads), _frozen(
            n_heads=p.n_heads, n_queries=p.n_queries, n_keys=p.n_keys, n_prefix=p.n_prefix, group=p.group,
            scale=p.scale, qk_scale=p.scale * LOG2E, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, **p.features(),
            **p.dims(), **dtype_flags(p.dtype, device)),
            launch_options(tile.num_warps, tile.num_stages, device), p.terms.kernel_arg(sinks=False))
    epilogue = None
    if convert_dq or convert_dprefix or needs.dsinks:
        epilogue = _epilogue_launch(p, needs, tile, convert_dq, convert_dprefix, prefix_acc, prologue.grid[0], device)
    return BackwardPlan(blocks=cfg, tiles=tile, needs=needs, dq_atomic=dq_atomic, dq_acc=convert_dq, chunks=chunks,
                        prefix_acc=prefix_acc, dsink_parts=p.batch * p.n_heads * prologue.grid[0] if needs.dsinks else 0,
                        convert_dq=convert_dq, convert_dprefix=convert_dprefix, prologue=prologue, dq=dq, main=main,
                        epilogue=epilogue)


def _main_launch(p: Problem, needs: Needs, cfg: BlockConfig, device: DeviceProps) -> tuple[Optional[Launch], int]:
    """The one-pass kernel: prefix programs (``chunks`` per prefix block and kv head), then sequence
    programs (one per key block, row and kv head); None when neither has work. Returns (launch, chunks)."""
    dq_atomic = needs.dq and not needs.deterministic
    seq_programs = _cdiv(p.n_keys, cfg.block_n) * p.batch * p.n_kv_heads if (dq_atomic or needs.dkdv) else 0
    prefix_tiles = _cdiv(p.n_prefix, cfg.block_n) * p.n_kv_heads
    n_items = p.batch * p.group * _cdiv(p.n_queries, cfg.block_m)
    heaviest = p.group * _cdiv(p.n_queries, cfg.block_m) if seq_programs else 0
    chunks = 0
    if needs.dprefix or (dq_atomic and p.n_prefix > 0):
        prefix_bytes = 4 * p.n_prefixes * p.n_kv_heads * p.n_prefix * p.head_dim
        chunks = prefix_grad_chunks(n_items, prefix_tiles, device.num_sms, heaviest,
                                    prefix_bytes if needs.deterministic else 0)
    prefix_programs = prefix_tiles * chunks
    if prefix_programs + seq_programs == 0:
        return None, chunks
    args = _frozen(
        batch=p.batch, n_heads=p.n_heads, n_kv_heads=p.n_kv_heads, n_queries=p.n_queries, n_keys=p.n_keys,
        n_prefix=p.n_prefix, group=p.group, n_prefix_programs=prefix_programs, n_items=n_items,
        items_per_chunk=_cdiv(n_items, max(chunks, 1)), scale=p.scale, qk_scale=p.scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **p.features(), NEED_DQ=dq_atomic, NEED_DKDV=needs.dkdv,
        NEED_DPREFIX=needs.dprefix, DETERMINISTIC=needs.deterministic, PREFIX_PROGRAMS=prefix_programs > 0,
        SEQ_PROGRAMS=seq_programs > 0, **p.dims(), **dtype_flags(p.dtype, device))
    return Launch((prefix_programs + seq_programs,), args, launch_options(cfg.num_warps, cfg.num_stages, device),
                  p.terms.kernel_arg(sinks=False)), chunks


ZERO_BLOCK = 1024  # elements per step of the prologue's zeroing of the prefix accumulators
EPILOGUE_BLOCK = 1024  # prefix-gradient elements per epilogue program


def _prologue_launch(p: Problem, needs: Needs, tile: BlockConfig, prefix_acc: int, device: DeviceProps) -> Launch:
    """delta, the zeroing of the dq accumulator and of the prefix accumulators, the sink-gradient partials."""
    grid = (_cdiv(p.n_queries, tile.block_m), p.batch * p.n_heads)
    per_prefix = p.n_prefixes * p.n_kv_heads * p.n_prefix
    n_zero, n_zero_v = prefix_acc * per_prefix * p.head_dim, prefix_acc * per_prefix * p.head_dim_v
    zero_per_program = _cdiv(_cdiv(max(n_zero, n_zero_v), grid[0] * grid[1]), ZERO_BLOCK) * ZERO_BLOCK
    args = _frozen(n_heads=p.n_heads, n_queries=p.n_queries, n_zero=n_zero, n_zero_v=n_zero_v,
                   zero_per_program=zero_per_program, BLOCK_M=tile.block_m, ZERO_DQ=needs.dq and not needs.deterministic,
                   ZERO_BLOCK=ZERO_BLOCK if n_zero else 0, ACC_DTYPE=dtype_flags(p.dtype, device)["ACC_DTYPE"],
                   **({"SINK_GRAD": True} if needs.dsinks else {}), **p.dims())
    d_pad = head_dim_padded(max(p.head_dim, p.head_dim_v))
    return Launch(grid, args, elementwise_options(tile.block_m * d_pad, device))


def _epilogue_launch(p: Problem, needs: Needs, tile: BlockConfig, convert_dq: bool, convert_dprefix: bool,
                     prefix_acc: int, sink_parts: int, device: DeviceProps) -> Launch:
    """dq fp32 -> q's dtype, the prefix accumulators (summed over chunks) -> the prefix dtype, the sink gradient."""
    dq_programs = _cdiv(p.n_queries, tile.block_m) * p.batch * p.n_heads if convert_dq else 0
    per_prefix = p.n_prefixes * p.n_kv_heads * p.n_prefix
    n_elems, n_elems_v = per_prefix * p.head_dim, per_prefix * p.head_dim_v
    dp_programs = _cdiv(max(n_elems, n_elems_v), EPILOGUE_BLOCK) if convert_dprefix else 0
    sinks = {} if not needs.dsinks else dict(n_dp_programs=dp_programs, batch=p.batch, sink_parts=sink_parts,
                                             SINK_GRAD=True)
    args = _frozen(n_heads=p.n_heads, n_queries=p.n_queries, n_dq_programs=dq_programs, n_prefix_elems=n_elems,
                   n_chunks=prefix_acc if convert_dprefix else 0, BLOCK_M=tile.block_m, BLOCK_E=EPILOGUE_BLOCK,
                   CONVERT_DQ=convert_dq, CONVERT_DPREFIX=convert_dprefix, HEAD_DIM=p.head_dim,
                   HEAD_DIM_PAD=head_dim_padded(p.head_dim), **sinks, n_prefix_elems_v=n_elems_v)
    d_pad = head_dim_padded(max(p.head_dim, p.head_dim_v))
    grid = (dq_programs + dp_programs + (p.n_heads if needs.dsinks else 0),)
    return Launch(grid, args, elementwise_options(tile.block_m * d_pad, device))


# ---------------------------------------------------------------- printing

def describe(plan) -> dict:
    """A plan as plain JSON-ready data (dtypes and Triton types as strings)."""
    if isinstance(plan, tl.constexpr):
        return describe(plan.value)
    if isinstance(plan, ScoreArgs):
        return {k: describe(v) for k, v in plan._asdict().items()}
    if isinstance(plan, Mapping):
        return {k: describe(v) for k, v in plan.items()}
    if isinstance(plan, (list, tuple)):
        return [describe(v) for v in plan]
    if hasattr(plan, "__dataclass_fields__"):
        return {f.name: describe(getattr(plan, f.name)) for f in fields(plan)}
    return plan if plan is None or isinstance(plan, (bool, int, float, str)) else str(plan)


def format_plan(plan, indent: str = "") -> str:
    """A plan as indented lines, one field (or one launch) per line."""
    lines = [f"{indent}{type(plan).__name__}"]
    for f in fields(plan):
        value = getattr(plan, f.name)
        if isinstance(value, Launch):
            args = ", ".join(f"{k}={describe(v)}" for k, v in value.args.items())
            opts = ", ".join(f"{k}={v}" for k, v in value.options.items())
            terms = "" if value.terms is None else f" terms={describe(value.terms)}"
            lines.append(f"{indent}  {f.name}: grid {value.grid} [{opts}] {args}{terms}")
        elif value is not None:
            lines.append(f"{indent}  {f.name}: {describe(value)}")
    return "\n".join(lines)
