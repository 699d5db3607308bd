"""Launchers for the Triton kernels: allocation, grids, strides, block configs.

Each launcher takes validated tensors (see functional.validate_inputs) and returns new tensors;
it never copies or expands its inputs. Prefixes arrive as [T, Hkv, P, D] (a shared prefix is T = 1).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from prefix_kernels.kernels.backward import (
    backward_epilogue_kernel, backward_kernel, backward_prologue_kernel, dq_kernel,
)
from prefix_kernels.kernels.configs import (
    BlockConfig, combine_num_warps, decode_block_rows, decode_config, decode_num_splits, head_dim_padded,
    kernel_configs, prefix_grad_chunks, shared_prefix_block_rows, shared_prefix_config, shared_prefix_tiles,
    use_decode_kernel, use_shared_prefix_decode,
)
from prefix_kernels.kernels.decode import (
    prefix_attention_decode_combine_kernel, prefix_attention_decode_kernel, prefix_attention_shared_prefix_kernel,
)
from prefix_kernels.kernels.forward import prefix_attention_fwd_kernel

LOG2E = 1.4426950408889634
_ACC = {torch.float64: tl.float64}


# Triton chooses the interpreter when it decorates a kernel, i.e. when the kernel modules above are
# imported: read once (an environment lookup per launch costs host time, see tests/test_host_overhead.py).
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    return _INTERPRETING


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr function in newer Triton: ~2 us per host call


def _capability(device: torch.device) -> tuple[int, int] | None:
    if interpreting() or device.type != "cuda":
        return None
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


@lru_cache(maxsize=None)  # per launch otherwise: host time matters
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _num_sms(device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return 2
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# The launch-option dicts below are cached (host time) and shared: callers only unpack them.
@lru_cache(maxsize=None)
def _dtype_flags(dtype: torch.dtype) -> dict:
    """UPCAST: the interpreter cannot tl.dot 16-bit floats, so compute in fp32 there.
    PRECISION "fma": fp64 products without tl.dot (see kernels.forward.mm)."""
    return dict(
        UPCAST=interpreting() and dtype in (torch.float16, torch.bfloat16),
        PRECISION={torch.float64: "fma", torch.float32: "ieee"}.get(dtype, "tf32"),
        ACC_DTYPE=_ACC.get(dtype, tl.float32),
    )


@lru_cache(maxsize=None)
def _launch_opts(cfg: BlockConfig) -> dict:
    if interpreting():
        return {}
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@lru_cache(maxsize=None)
def _elementwise_opts(tile_elems: int) -> dict:
    """The backward's prologue/epilogue (loads, a row reduction, stores; no matmul): 8 warps for
    [128, 128] tiles (4 spill there), else 4."""
    return {} if interpreting() else dict(num_warps=8 if tile_elems >= 128 * 128 else 4, num_stages=1)


def _mask_args(key_padding_mask: torch.Tensor | None, like: torch.Tensor):
    if key_padding_mask is None:
        return like, 0, 0  # never read: HAS_KPM is False
    kpm = key_padding_mask.view(torch.uint8)
    return kpm, kpm.stride(0), kpm.stride(1)


def _prefix_ids_arg(prefix_ids: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Contiguous, any integer dtype (no cast launch): the kernels read PREFIX_IDS + b."""
    return like if prefix_ids is None else prefix_ids.contiguous()


def _new_like(t: torch.Tensor, contiguous: bool, zero: bool = False) -> torch.Tensor:
    """t's shape; t's memory layout (eager: HF's transposed views stay cheap), or a contiguous one
    (the registered ops: a layout the fake implementations can state without seeing real strides)."""
    fmt = torch.contiguous_format if contiguous else torch.preserve_format
    return torch.zeros_like(t, memory_format=fmt) if zero else torch.empty_like(t, memory_format=fmt)


def _score_args(causal: bool, sliding_window: int | None, softcap: float | None) -> dict:
    """The kernels' arguments for a sliding window and logit softcapping (kernels/tiles.py); {} (the
    kernels' defaults) when neither is on."""
    if sliding_window is None and softcap is None:
        return {}
    return dict(softcap2=(1.0 if softcap is None else softcap) * LOG2E,
                window=0 if sliding_window is None else sliding_window,
                WINDOW_MASK=0 if sliding_window is None else (1 if causal else 2), SOFTCAP=softcap is not None)


def _sink_args(sinks: torch.Tensor | None) -> dict:
    """The kernels read head h's sink at SINKS + h: a strided or expanded [Hq] view must be copied."""
    return {} if sinks is None else dict(SINKS=sinks.contiguous(), HAS_SINKS=True)


def _new_out(q: torch.Tensor, head_dim_v: int, contiguous: bool) -> torch.Tensor:
    """[B, Hq, N, Dv] in q's dtype, laid out like q (HF's transposed views stay cheap), or contiguous."""
    if head_dim_v == q.shape[3]:
        return _new_like(q, contiguous)
    shape = (*q.shape[:3], head_dim_v)
    if contiguous:
        return q.new_empty(shape)
    order = sorted(range(3), key=lambda d: -q.stride(d)) + [3]  # q's dim order, D innermost as in q's views
    return q.new_empty([shape[d] for d in order]).permute([order.index(d) for d in range(4)])


def _dim_args(head_dim: int, head_dim_v: int) -> dict:
    return dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_padded(head_dim), HEAD_DIM_V=head_dim_v,
                HEAD_DIM_V_PAD=head_dim_padded(head_dim_v))


def prefix_attention_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale,
                             *, contiguous_out: bool = False, sliding_window: int | None = None,
                             softcap: float | None = None, sinks: torch.Tensor | None = None):
    """Returns out (q's dtype, q's memory layout) and lse [B, Hq, N] fp32 in log2 units
    (``log2(sum_j 2^(s_j))`` with s = scale * log2(e) * q.k; natural log = lse * ln 2): the
    backward needs it in exactly the forward's units (see kernels/forward.py). ``sliding_window``,
    ``softcap`` and ``sinks`` [Hq] as in functional.prefix_attention."""
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    out = _new_out(q, v.shape[3], contiguous_out)
    lse = torch.empty(batch, n_heads, n_queries, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    features = _score_args(causal, sliding_window, softcap) | _sink_args(sinks)
    if use_decode_kernel(n_queries, n_heads // n_kv_heads, q.dtype):
        prefix_attention_decode(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, out, lse,
                                sliding_window, features)
        return out, lse
    cfg = kernel_configs(max(head_dim, v.shape[3]), q.dtype, _capability(q.device),
                         sliding_window is not None).forward
    kpm, stride_mb, stride_mn = _mask_args(key_padding_mask, q)
    grid = (_cdiv(n_queries, cfg.block_m), batch * n_heads)
    prefix_attention_fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, _prefix_ids_arg(prefix_ids, q), kpm, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
        stride_mb, stride_mn, *out.stride(), lse.stride(0), lse.stride(1),
        n_heads, n_queries, n_keys, prefix_k.shape[2], n_heads // n_kv_heads, scale * LOG2E,
        **_dim_args(head_dim, v.shape[3]), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        IS_CAUSAL=causal, HAS_KPM=key_padding_mask is not None, HAS_PREFIX_IDS=prefix_ids is not None,
        **_dtype_flags(q.dtype), **_launch_opts(cfg), **features,
    )
    return out, lse


def prefix_attention_decode(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, out, lse,
                            sliding_window=None, features=None):
    """The split-KV decode forward (kernels/decode.py) into ``out`` and ``lse`` (log2 units), for
    few queries per row. One split: the split kernel writes out/lse itself; several: fp32 partials
    [B, Hq, N, splits, D] (+ m, l) and a combine kernel. With a sliding window the split axis
    leaves out the sequence keys before the first query's window (the work grows with the window)."""
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    n_prefix, group = prefix_k.shape[2], n_heads // n_kv_heads
    head_dim_v = v.shape[3]
    d_pad = head_dim_padded(max(head_dim, head_dim_v))
    dv_pad = head_dim_padded(head_dim_v)
    block_r = decode_block_rows(n_queries * group)
    cfg = decode_config(d_pad, q.element_size(), block_r, _capability(q.device))
    seq_start = 0 if sliding_window is None else max(0, n_keys - n_queries - sliding_window + 1)
    kpm, stride_mb, stride_mn = _mask_args(key_padding_mask, q)
    features = dict(features or {})
    upcast = interpreting() and q.dtype in (torch.float16, torch.bfloat16)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    opts = {} if interpreting() else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # the cascade: the prefix once per kv head for all rows that use it (a bank: per prefix, rows found
    # on the device), then the rows' own keys. A bank of one is one shared prefix.
    n_bank = prefix_k.shape[0] if prefix_ids is not None else 1
    ids = _prefix_ids_arg(prefix_ids, q)
    shared = False
    if n_prefix > 0:
        prefix_rows = shared_prefix_block_rows(_capability(q.device))
        prefix_tiles, work_tiles = shared_prefix_tiles(batch, n_queries * group, prefix_rows, n_bank)
        prefix_splits, prefix_per_split = decode_num_splits(
            n_prefix, n_kv_heads * work_tiles, _num_sms(q.device), shared_prefix_config(cfg, _capability(q.device)))
        shared = use_shared_prefix_decode(batch, n_queries * group, n_prefix, n_keys - seq_start, head_dim,
                                          head_dim_v, q.element_size(), prefix_splits, prefix_rows, n_bank)
    if shared:
        seq_splits, per_split = decode_num_splits(n_keys - seq_start, batch * n_kv_heads, _num_sms(q.device), cfg)
        splits, base = prefix_splits + seq_splits, prefix_splits
    else:
        splits, per_split = decode_num_splits(n_prefix + n_keys - seq_start, batch * n_kv_heads, _num_sms(q.device),
                                              cfg)
        seq_splits, base = splits, 0
    if splits > 1:
        acc_part = torch.empty(batch, n_heads, n_queries, splits, head_dim_v, device=q.device, dtype=torch.float32)
        ml_part = torch.empty(2, batch, n_heads, n_queries, splits, device=q.device, dtype=torch.float32)
        m_part, l_part = ml_part[0], ml_part[1]
    else:
        acc_part = m_part = l_part = lse  # never read: SPLIT is False
    row_features = features
    if shared:
        sink_features = {k: features[k] for k in ("SINKS", "HAS_SINKS") if k in features}
        bank_args = {} if n_bank == 1 else dict(  # (prefix, tile) pairs on grid axis 2; ids read on the device
            PREFIX_IDS=ids, stride_pkt=prefix_k.stride(0), stride_pvt=prefix_v.stride(0), n_batch=batch,
            tiles_per_prefix=prefix_tiles, HAS_PREFIX_IDS=True, BLOCK_B=min(64, max(16, 1 << (batch - 1).bit_length())))
        prefix_attention_shared_prefix_kernel[(n_kv_heads, prefix_splits, n_bank * prefix_tiles)](
            q, prefix_k, prefix_v, acc_part, m_part, l_part, *q.stride(), *prefix_k.stride()[1:],
            *prefix_v.stride()[1:], n_heads, n_queries, batch * n_queries * group, n_prefix, group, splits,
            prefix_per_split, scale * LOG2E, **_dim_args(head_dim, head_dim_v), BLOCK_R=prefix_rows,
            BLOCK_N=cfg.block_n, UPCAST=upcast, PRECISION=precision,
            **{k: features[k] for k in ("softcap2", "SOFTCAP") if k in features}, **sink_features, **bank_args, **opts)
        row_features = {k: v for k, v in features.items() if k not in sink_features}  # split 0 carries the sink
    prefix_attention_decode_kernel[(batch * n_kv_heads, seq_splits)](
        q, k, v, prefix_k, prefix_v, ids, kpm, out, lse, acc_part, m_part, l_part,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
        stride_mb, stride_mn, *out.stride(), lse.stride(0), lse.stride(1),
        n_heads, n_kv_heads, n_queries, n_keys, 0 if shared else n_prefix, group, splits, per_split, scale * LOG2E,
        **_dim_args(head_dim, head_dim_v), BLOCK_R=block_r, BLOCK_N=cfg.block_n,
        IS_CAUSAL=causal, HAS_KPM=key_padding_mask is not None, HAS_PREFIX_IDS=prefix_ids is not None,
        SPLIT=splits > 1, UPCAST=upcast, PRECISION=precision, **opts, **row_features,
        **({"seq_start": seq_start} if seq_start else {}), **({"split_base": base} if base else {}),
    )
    if splits > 1:
        block_s = triton.next_power_of_2(splits)
        prefix_attention_decode_combine_kernel[(batch * n_heads * n_queries,)](
            acc_part, m_part, l_part, out, lse, *out.stride(), lse.stride(0), lse.stride(1),
            n_heads, n_queries, splits,
            HEAD_DIM=head_dim_v, HEAD_DIM_PAD=dv_pad, BLOCK_S=block_s,  # the combine only sees values
            **({} if interpreting() else dict(num_warps=combine_num_warps(block_s, dv_pad), num_stages=1)),
        )
    return out, lse


def prefix_attention_backward(
    grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_ids, causal, scale,
    *, need_dq: bool, need_dkdv: bool, need_dprefix: bool, deterministic: bool, contiguous_grads: bool = False,
    sliding_window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
    need_dsinks: bool = False,
):
    """Returns (dq, dk, dv, dprefix_k, dprefix_v, dsinks); a gradient not asked for is None and no
    kernel computes it. dprefix_* have prefix_k's [T, Hkv, P, D] shape and dtype, dsinks sinks'.

    Launches (kernels/backward.py): the prologue (delta, zeroed accumulators), the one-pass kernel,
    and the epilogue when an fp32 accumulator must become a 16-bit gradient (or chunk partials be
    summed); deterministic mode adds the dq pass. Nothing else touches device memory."""
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    n_prefix = prefix_k.shape[2]
    group = n_heads // n_kv_heads
    nothing_to_do = q.numel() == 0  # no query: every gradient is zero
    dq = _new_like(q, contiguous_grads, nothing_to_do) if need_dq else None
    dk = _new_like(k, contiguous_grads, nothing_to_do) if need_dkdv else None
    dv = _new_like(v, contiguous_grads, nothing_to_do) if need_dkdv else None
    dpk = dpv = None
    if need_dprefix and (n_prefix == 0 or nothing_to_do):  # P = 0: an empty gradient; no query: zeros
        dpk, dpv, need_dprefix = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v), False
    need_dsinks = need_dsinks and sinks is not None
    dsinks = torch.zeros_like(sinks) if need_dsinks and nothing_to_do else None
    if nothing_to_do or not (need_dq or need_dkdv or need_dprefix or need_dsinks):
        return dq, dk, dv, dpk, dpv, dsinks

    head_dim_v = v.shape[3]
    configs = kernel_configs(max(head_dim, head_dim_v), q.dtype, _capability(q.device))
    flags = _dtype_flags(q.dtype)
    d_pad = head_dim_padded(max(head_dim, head_dim_v))
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    kpm, stride_mb, stride_mn = _mask_args(key_padding_mask, q)
    ids = _prefix_ids_arg(prefix_ids, q)
    common = _dim_args(head_dim, head_dim_v)
    cfg, tile = configs.backward, configs.dq
    score_args = _score_args(causal, sliding_window, softcap)

    # dq: atomics into an fp32 accumulator (dq itself when q is fp32/fp64), or its own pass.
    dq_atomic = need_dq and not deterministic
    dq_acc = None
    if dq_atomic:
        dq_acc = dq if dq.dtype == acc_dtype else torch.empty(q.shape, device=q.device, dtype=acc_dtype)
    # Prefix work: chunks of (row, query head, query block) items per (prefix block, kv head).
    seq_programs = _cdiv(n_keys, cfg.block_n) * batch * n_kv_heads if (dq_atomic or need_dkdv) else 0
    prefix_tiles = _cdiv(n_prefix, cfg.block_n) * n_kv_heads
    n_items = batch * group * _cdiv(n_queries, cfg.block_m)
    heaviest = group * _cdiv(n_queries, cfg.block_m) if seq_programs else 0
    chunks = 0
    if need_dprefix or (dq_atomic and n_prefix > 0):
        chunks = prefix_grad_chunks(n_items, prefix_tiles, _num_sms(q.device), heaviest,
                                    4 * prefix_k.numel() if deterministic else 0)
    dpk_acc = dpv_acc = q  # never read unless need_dprefix
    if need_dprefix:  # fp32 accumulators [C, T, Hkv, P, D] (C = 1 unless deterministic), zeroed by the prologue
        n_acc = chunks if deterministic else 1
        dpk_acc = torch.empty((n_acc, *prefix_k.shape), device=q.device, dtype=acc_dtype)
        dpv_acc = torch.empty((n_acc, *prefix_v.shape), device=q.device, dtype=acc_dtype)
    n_zero = dpk_acc.numel() if need_dprefix else 0
    n_zero_v = dpv_acc.numel() if need_dprefix else 0

    delta = torch.empty(batch, n_heads, n_queries, device=q.device, dtype=acc_dtype)
    prologue_grid = (_cdiv(n_queries, tile.block_m), batch * n_heads)
    lse = lse.contiguous()
    sink_args = {}
    if need_dsinks:  # per (row, head, query block) partials of the sink gradient, summed by the epilogue
        sinks = sinks.contiguous()  # read and written at SINKS + h / DSINKS + h
        dsinks = torch.empty(sinks.shape, device=sinks.device, dtype=sinks.dtype)
        dsink_part = torch.empty(batch * n_heads * prologue_grid[0], device=q.device, dtype=torch.float32)
        sink_args = dict(LSE=lse, SINKS=sinks, DSINK_PART=dsink_part, SINK_GRAD=True)
    zero_block = 1024 if n_zero else 0
    zero_per_program = _cdiv(_cdiv(max(n_zero, n_zero_v), prologue_grid[0] * prologue_grid[1]), 1024) * 1024
    dqz = dq_acc if dq_atomic else q
    backward_prologue_kernel[prologue_grid](
        out, grad_out, delta, dqz, dpk_acc, dpv_acc, *out.stride(), *grad_out.stride(), *dqz.stride(),
        n_heads, n_queries, n_zero, n_zero_v, zero_per_program,
        BLOCK_M=tile.block_m, ZERO_DQ=dq_atomic, ZERO_BLOCK=zero_block, ACC_DTYPE=flags["ACC_DTYPE"], **sink_args,
        **common, **_elementwise_opts(tile.block_m * d_pad),
    )

    if need_dq and deterministic:
        dq_kernel[(_cdiv(n_queries, tile.block_m), batch * n_heads)](
            q, k, v, prefix_k, prefix_v, ids, kpm, grad_out, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
            stride_mb, stride_mn, *grad_out.stride(), *dq.stride(),
            n_heads, n_queries, n_keys, n_prefix, group, scale, scale * LOG2E,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, IS_CAUSAL=causal, HAS_KPM=key_padding_mask is not None,
            HAS_PREFIX_IDS=prefix_ids is not None, **common, **flags, **_launch_opts(tile), **score_args,
        )

    prefix_programs = prefix_tiles * chunks
    if prefix_programs + seq_programs > 0:
        dqa = dq_acc if dq_atomic else q
        dka, dva = (dk, dv) if need_dkdv else (k, v)
        gstride = dpk_acc.stride()[:4] if need_dprefix else (0, 0, 0, 0)  # (chunk, t, kv head, key)
        gstride_v = dpv_acc.stride()[:4] if need_dprefix else (0, 0, 0, 0)
        backward_kernel[(prefix_programs + seq_programs,)](
            q, k, v, prefix_k, prefix_v, ids, kpm, grad_out, lse, delta, dqa, dka, dva, dpk_acc, dpv_acc,
            *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
            stride_mb, stride_mn, *grad_out.stride(), *dqa.stride(), *dka.stride(), *dva.stride(), *gstride, *gstride_v,
            batch, n_heads, n_kv_heads, n_queries, n_keys, n_prefix, group,
            prefix_programs, n_items, _cdiv(n_items, max(chunks, 1)), scale, scale * LOG2E,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IS_CAUSAL=causal, HAS_KPM=key_padding_mask is not None,
            HAS_PREFIX_IDS=prefix_ids is not None, NEED_DQ=dq_atomic, NEED_DKDV=need_dkdv,
            NEED_DPREFIX=need_dprefix, DETERMINISTIC=deterministic, PREFIX_PROGRAMS=prefix_programs > 0,
            SEQ_PROGRAMS=seq_programs > 0, **common, **flags, **_launch_opts(cfg), **score_args,
        )

    convert_dq = dq_atomic and dq_acc is not dq
    convert_dprefix = need_dprefix and (deterministic or prefix_k.dtype != acc_dtype)
    if need_dprefix and not convert_dprefix:
        dpk, dpv = dpk_acc[0], dpv_acc[0]  # the fp32/fp64 accumulators are the gradients
    elif need_dprefix:
        # contiguous (not empty_like, which keeps a permuted prefix's strides): the epilogue writes flat offsets
        dpk, dpv = (torch.empty(p.shape, device=p.device, dtype=p.dtype) for p in (prefix_k, prefix_v))
    if convert_dq or convert_dprefix or need_dsinks:
        dq_programs = _cdiv(n_queries, tile.block_m) * batch * n_heads if convert_dq else 0
        n_elems, n_elems_v = prefix_k.numel(), prefix_v.numel()
        block_e = 1024
        dp_programs = _cdiv(max(n_elems, n_elems_v), block_e) if convert_dprefix else 0
        dqc = dq_acc if convert_dq else q
        dqo = dq if convert_dq else q
        sink_args = {} if not need_dsinks else dict(n_dp_programs=dp_programs, DSINK_PART=dsink_part, DSINKS=dsinks,
                                                    batch=batch, sink_parts=prologue_grid[0], SINK_GRAD=True)
        backward_epilogue_kernel[(dq_programs + dp_programs + (n_heads if need_dsinks else 0),)](
            dqc, dqo, dpk_acc, dpv_acc, dpk if convert_dprefix else q, dpv if convert_dprefix else q,
            *dqc.stride(), *dqo.stride(),
            n_heads, n_queries, dq_programs, n_elems, dpk_acc.shape[0] if convert_dprefix else 0,
            BLOCK_M=tile.block_m, BLOCK_E=block_e, CONVERT_DQ=convert_dq, CONVERT_DPREFIX=convert_dprefix,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=common["HEAD_DIM_PAD"], **_elementwise_opts(tile.block_m * d_pad),
            **sink_args, n_prefix_elems_v=n_elems_v,
        )
    return dq, dk, dv, dpk, dpv, dsinks
