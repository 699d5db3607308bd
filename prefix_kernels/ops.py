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

from prefix_kernels.kernels.backward import delta_kernel, dkdv_kernel, dprefix_kernel, dq_kernel
from prefix_kernels.kernels.configs import BlockConfig, head_dim_padded, kernel_configs
from prefix_kernels.kernels.decode import (
    combine_num_warps, decode_block_rows, decode_config, decode_num_splits, prefix_attention_decode_combine_kernel,
    prefix_attention_decode_kernel,
)
from prefix_kernels.kernels.forward import prefix_attention_fwd_kernel

LOG2E = 1.4426950408889634
_ACC = {torch.float64: tl.float64}
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
# Upper bound on the fp32 partial buffer of the deterministic prefix-gradient reduction.
_PARTIALS_BYTES = 256 * 2**20


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dtype_flags(dtype: torch.dtype) -> dict:
    """UPCAST: the interpreter cannot tl.dot 16-bit floats, so compute in fp32 there.
    PRECISION "fma": fp64 products without tl.dot (see kernels.forward.mm)."""
    return dict(
        UPCAST=interpreting() and dtype in (torch.float16, torch.bfloat16),
        PRECISION={torch.float64: "fma", torch.float32: "ieee"}.get(dtype, "tf32"),
        ACC_DTYPE=_ACC.get(dtype, tl.float32),
    )


def _launch_opts(cfg: BlockConfig) -> dict:
    if interpreting():
        return {}
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _mask_args(key_padding_mask: torch.Tensor | None, like: torch.Tensor):
    if key_padding_mask is None:
        return like, 0, 0  # never read: HAS_KPM is False
    kpm = key_padding_mask.view(torch.uint8)
    return kpm, kpm.stride(0), kpm.stride(1)


def _prefix_ids_arg(prefix_ids: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """int32 and contiguous: the kernels read PREFIX_IDS + b."""
    return like if prefix_ids is None else prefix_ids.to(torch.int32).contiguous()


def _new_like(t: torch.Tensor, contiguous: bool, zero: bool = False) -> torch.Tensor:
    """t's shape; t's memory layout (eager: HF's transposed views stay cheap), or a contiguous one
    (the registered ops: a layout the fake implementations can state without seeing real strides)."""
    fmt = torch.contiguous_format if contiguous else torch.preserve_format
    return torch.zeros_like(t, memory_format=fmt) if zero else torch.empty_like(t, memory_format=fmt)


def prefix_attention_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale,
                             *, contiguous_out: bool = False):
    """Returns out (q's dtype, q's memory layout) and lse [B, Hq, N] fp32 in log2 units
    (``log2(sum_j 2^(s_j))`` with s = scale * log2(e) * q.k; natural log = lse * ln 2): the
    backward needs it in exactly the forward's units (see kernels/forward.py)."""
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    out = _new_like(q, contiguous_out)
    lse = torch.empty(batch, n_heads, n_queries, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    if (q.dtype != torch.float64 and n_queries <= DECODE_MAX_QUERIES
            and n_queries * (n_heads // n_kv_heads) <= DECODE_MAX_ROWS):
        prefix_attention_decode(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, out, lse)
        return out, lse
    cfg = kernel_configs(head_dim, q.dtype, _capability(q.device)).forward
    kpm, stride_mb, stride_mn = _mask_args(key_padding_mask, q)
    grid = (triton.cdiv(n_queries, cfg.block_m), batch * n_heads)
    prefix_attention_fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, _prefix_ids_arg(prefix_ids, q), kpm, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
        stride_mb, stride_mn, *out.stride(), lse.stride(0), lse.stride(1),
        n_heads, n_queries, n_keys, prefix_k.shape[2], n_heads // n_kv_heads, scale * LOG2E,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_padded(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        IS_CAUSAL=causal, HAS_KPM=key_padding_mask is not None, HAS_PREFIX_IDS=prefix_ids is not None,
        **_dtype_flags(q.dtype), **_launch_opts(cfg),
    )
    return out, lse


def prefix_attention_decode(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, out, lse):
    """The split-KV decode forward (kernels/decode.py) into ``out`` and ``lse`` (log2 units), for
    few queries per row. One split: the split kernel writes out/lse itself; several: fp32 partials
    [B, Hq, N, splits, D] (+ m, l) and a combine kernel."""
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    n_prefix, group = prefix_k.shape[2], n_heads // n_kv_heads
    d_pad = head_dim_padded(head_dim)
    block_r = decode_block_rows(n_queries * group)
    cfg = decode_config(d_pad, q.element_size(), block_r, _capability(q.device))
    splits, per_split = decode_num_splits(n_prefix + n_keys, batch * n_kv_heads, _num_sms(q.device), cfg)
    kpm, stride_mb, stride_mn = _mask_args(key_padding_mask, q)
    if splits > 1:
        acc_part = torch.empty(batch, n_heads, n_queries, splits, head_dim, device=q.device, dtype=torch.float32)
        ml_part = torch.empty(2, batch, n_heads, n_queries, splits, device=q.device, dtype=torch.float32)
        m_part, l_part = ml_part[0], ml_part[1]
    else:
        acc_part = m_part = l_part = lse  # never read: SPLIT is False
    opts = {} if interpreting() else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    prefix_attention_decode_kernel[(batch * n_kv_heads, splits)](
        q, k, v, prefix_k, prefix_v, _prefix_ids_arg(prefix_ids, q), kpm, out, lse, acc_part, m_part, l_part,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
        stride_mb, stride_mn, *out.stride(), lse.stride(0), lse.stride(1),
        n_heads, n_kv_heads, n_queries, n_keys, n_prefix, group, splits, per_split, scale * LOG2E,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, BLOCK_R=block_r, BLOCK_N=cfg.block_n,
        IS_CAUSAL=causal, HAS_KPM=key_padding_mask is not None, HAS_PREFIX_IDS=prefix_ids is not None,
        SPLIT=splits > 1, UPCAST=interpreting() and q.dtype in (torch.float16, torch.bfloat16),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **opts,
    )
    if splits > 1:
        block_s = triton.next_power_of_2(splits)
        prefix_attention_decode_combine_kernel[(batch * n_heads * n_queries,)](
            acc_part, m_part, l_part, out, lse, *out.stride(), lse.stride(0), lse.stride(1),
            n_heads, n_queries, splits,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, BLOCK_S=block_s,
            **({} if interpreting() else dict(num_warps=combine_num_warps(block_s, d_pad), num_stages=1)),
        )
    return out, lse


def _prefix_grad_chunks(n_items: int, n_tiles: int, n_sms: int, partial_bytes_per_chunk: int) -> int:
    """Chunks of the batch reduction: enough programs for ~4 waves, within the partials budget."""
    chunks = max(1, triton.cdiv(4 * n_sms, max(n_tiles, 1)))
    chunks = min(chunks, n_items, max(1, _PARTIALS_BYTES // max(partial_bytes_per_chunk, 1)))
    return triton.cdiv(n_items, triton.cdiv(n_items, chunks))  # no empty chunk


def prefix_attention_backward(
    grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_ids, causal, scale,
    *, need_dq: bool, need_dkdv: bool, need_dprefix: bool, deterministic: bool, contiguous_grads: bool = False,
):
    """Returns (dq, dk, dv, dprefix_k, dprefix_v); a gradient not asked for is None and its kernel
    does not run. dprefix_* have prefix_k's [T, Hkv, P, D] shape and dtype."""
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    n_prefixes, n_prefix = prefix_k.shape[0], prefix_k.shape[2]
    group = n_heads // n_kv_heads
    nothing_to_do = q.numel() == 0  # no query: every gradient is zero
    dq = _new_like(q, contiguous_grads, nothing_to_do) if need_dq else None
    dk = _new_like(k, contiguous_grads, nothing_to_do) if need_dkdv else None
    dv = _new_like(v, contiguous_grads, nothing_to_do) if need_dkdv else None
    needs_dprefix_kernel = need_dprefix and prefix_k.shape[2] > 0 and not nothing_to_do
    # The dprefix kernel's fp32 buffers become dprefix below; zeros only when it does not run.
    dpk = torch.zeros_like(prefix_k) if need_dprefix and not needs_dprefix_kernel else None
    dpv = torch.zeros_like(prefix_v) if need_dprefix and not needs_dprefix_kernel else None
    if nothing_to_do or not (need_dq or need_dkdv or need_dprefix):
        return dq, dk, dv, dpk, dpv

    configs = kernel_configs(head_dim, q.dtype, _capability(q.device))
    flags = _dtype_flags(q.dtype)
    d_pad = head_dim_padded(head_dim)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    kpm, stride_mb, stride_mn = _mask_args(key_padding_mask, q)
    ids = _prefix_ids_arg(prefix_ids, q)
    has_kpm, has_ids = key_padding_mask is not None, prefix_ids is not None
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad)

    delta = torch.empty(batch, n_heads, n_queries, device=q.device, dtype=acc_dtype)
    cfg = configs.dq
    delta_kernel[(triton.cdiv(n_queries, cfg.block_m), batch * n_heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), n_heads, n_queries,
        BLOCK_M=cfg.block_m, ACC_DTYPE=flags["ACC_DTYPE"], **common, **_launch_opts(cfg),
    )
    lse = lse.contiguous()

    if need_dq:
        dq_kernel[(triton.cdiv(n_queries, cfg.block_m), batch * n_heads)](
            q, k, v, prefix_k, prefix_v, ids, kpm, grad_out, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
            stride_mb, stride_mn, *grad_out.stride(), *dq.stride(),
            n_heads, n_queries, n_keys, n_prefix, group, scale, scale * LOG2E,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IS_CAUSAL=causal, HAS_KPM=has_kpm, HAS_PREFIX_IDS=has_ids,
            **common, **flags, **_launch_opts(cfg),
        )

    cfg = configs.dkdv
    if need_dkdv and n_keys > 0:
        dkdv_kernel[(triton.cdiv(n_keys, cfg.block_n), batch * n_kv_heads)](
            q, k, v, kpm, grad_out, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *grad_out.stride(),
            *dk.stride(), *dv.stride(),
            n_heads, n_kv_heads, n_queries, n_keys, group, scale, scale * LOG2E,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IS_CAUSAL=causal, HAS_KPM=has_kpm,
            **common, **flags, **_launch_opts(cfg),
        )

    if needs_dprefix_kernel:
        block_n = max(16, min(cfg.block_n, triton.next_power_of_2(n_prefix)))
        n_tiles = triton.cdiv(n_prefix, block_n) * n_kv_heads
        n_items = batch * group * triton.cdiv(n_queries, cfg.block_m)
        grad_shape = (n_prefixes, n_kv_heads, n_prefix, head_dim)
        chunks = _prefix_grad_chunks(n_items, n_tiles, _num_sms(q.device), 4 * prefix_k.numel())
        shape = (chunks, *grad_shape) if deterministic else grad_shape
        partial = torch.empty(shape, device=q.device, dtype=acc_dtype)
        partial_v = torch.empty_like(partial)
        torch._foreach_zero_([partial, partial_v])  # one launch for both (host time matters)
        # Rows sorted by prefix id: each chunk meets each prefix in one contiguous run.
        row_order = torch.argsort(prefix_ids, stable=True).to(torch.int32) if has_ids else ids
        gstride = partial.stride()[-4:]
        dprefix_kernel[(triton.cdiv(n_prefix, block_n), n_kv_heads, chunks)](
            q, prefix_k, prefix_v, ids, row_order, grad_out, lse, delta, partial, partial_v,
            *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *grad_out.stride(),
            partial.stride(0) if deterministic else 0, *gstride[:3],
            n_heads, n_queries, n_prefix, group, n_items, triton.cdiv(n_items, chunks), scale, scale * LOG2E,
            BLOCK_M=cfg.block_m, BLOCK_N=block_n, HAS_PREFIX_IDS=has_ids, DETERMINISTIC=deterministic,
            **common, **flags, **_launch_opts(cfg),
        )
        if deterministic:
            partial, partial_v = partial.sum(0), partial_v.sum(0)
        dpk, dpv = partial.to(prefix_k.dtype), partial_v.to(prefix_v.dtype)  # no copy when already fp32
    return dq, dk, dv, dpk, dpv
