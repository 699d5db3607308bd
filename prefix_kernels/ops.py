"""Launchers for the Triton kernels: a plan (kernels/plan.py), then the launches it lists.

Each launcher takes validated tensors (see functional.validate_inputs) and returns new tensors;
it never copies or expands its inputs. Prefixes arrive as [T, Hkv, P, D] (a shared prefix is T = 1).
The plan decides every grid, block config, split, chunk and buffer from the shapes, the features and
the device's properties (:func:`device_props`, or a ``device=`` given by the caller, e.g.
``prefix-kernels inspect`` for a GPU it does not run on); a launcher allocates what the plan lists
and hands each kernel its tensors, their strides and the plan's arguments. Strides travel as one
tuple per tensor (``q.stride()``): Triton specializes each element as it does a scalar argument
(equal to 1, divisible by 16).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from prefix_kernels.kernels.backward import (
    backward_epilogue_kernel, backward_kernel, backward_prologue_kernel, dq_kernel,
)
from prefix_kernels.kernels.decode import (
    prefix_attention_decode_combine_kernel, prefix_attention_decode_kernel, prefix_attention_shared_prefix_kernel,
)
from prefix_kernels.kernels.forward import prefix_attention_fwd_kernel
from prefix_kernels.layout import new_out
from prefix_kernels.kernels.plan import (
    BackwardPlan, DecodePlan, DeviceProps, ForwardPlan, Needs, Problem, ScoreTerms, plan_backward,
    plan_forward,
)

# Triton chooses the interpreter when it decorates a kernel, i.e. when the kernel modules above are
# imported: read once (an environment lookup per launch costs host time, see tests/test_host_overhead.py).
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    return _INTERPRETING


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


def device_props(device: torch.device) -> DeviceProps:
    """The properties of the device a call's tensors live on, as the plan takes them."""
    return _props(_capability(device), _num_sms(device), interpreting())


@lru_cache(maxsize=None)
def _props(capability, sms: int, interpreted: bool) -> DeviceProps:
    return DeviceProps(capability=capability, num_sms=sms, interpreted=interpreted)


def problem(q, k, v, prefix_k, key_padding_mask, prefix_ids, causal, scale, sliding_window, softcap,
            sinks) -> Problem:
    """The plan's view of a call: shapes, dtype, which inputs are given, the score terms."""
    batch, n_heads, n_queries, head_dim = q.shape
    return Problem(batch=batch, n_heads=n_heads, n_kv_heads=k.shape[1], n_queries=n_queries, n_keys=k.shape[2],
                   n_prefix=prefix_k.shape[2], n_prefixes=prefix_k.shape[0], head_dim=head_dim,
                   head_dim_v=v.shape[3], dtype=q.dtype, has_mask=key_padding_mask is not None,
                   has_ids=prefix_ids is not None, scale=scale,
                   terms=ScoreTerms(causal=causal, sliding_window=sliding_window, softcap=softcap,
                                    sinks=sinks is not None))


def _mask_args(key_padding_mask: torch.Tensor | None, like: torch.Tensor):
    """(the mask as uint8, its (row, key) strides)."""
    if key_padding_mask is None:
        return like, (0, 0)  # never read: HAS_KPM is False
    kpm = key_padding_mask.view(torch.uint8)
    return kpm, kpm.stride()


def _prefix_ids_arg(prefix_ids: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Contiguous, any integer dtype (no cast launch): the kernels read PREFIX_IDS + b."""
    return like if prefix_ids is None else prefix_ids.contiguous()


def _new_like(t: torch.Tensor, contiguous: bool, zero: bool = False) -> torch.Tensor:
    """t's shape; t's memory layout (eager: HF's transposed views stay cheap), or a contiguous one
    (the registered ops: a layout the fake implementations can state without seeing real strides)."""
    fmt = torch.contiguous_format if contiguous else torch.preserve_format
    return torch.zeros_like(t, memory_format=fmt) if zero else torch.empty_like(t, memory_format=fmt)


def prefix_attention_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale,
                             *, contiguous_out: bool = False, sliding_window: int | None = None,
                             softcap: float | None = None, sinks: torch.Tensor | None = None,
                             device: DeviceProps | None = None):
    """Returns out (q's dtype, q's memory layout) and lse [B, Hq, N] fp32 in log2 units
    (``log2(sum_j 2^(s_j))`` with s = scale * log2(e) * q.k; natural log = lse * ln 2): the
    backward needs it in exactly the forward's units (see kernels/forward.py). ``sliding_window``,
    ``softcap`` and ``sinks`` [Hq] as in functional.prefix_attention; ``device``: the properties to
    plan for (default: those of q's device)."""
    out = new_out(q, v.shape[3], contiguous_out)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    plan = plan_forward(problem(q, k, v, prefix_k, key_padding_mask, prefix_ids, causal, scale, sliding_window,
                                softcap, sinks), device or device_props(q.device))
    sinks = None if sinks is None else sinks.contiguous()  # read at SINKS + h
    if isinstance(plan, DecodePlan):
        prefix_attention_decode(plan, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, out, lse, sinks)
    else:
        _launch_forward(plan, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, out, lse, sinks)
    return out, lse


def _terms(launch, sinks: torch.Tensor | None):
    """The launch's score terms (plan.ScoreArgs) with the sink tensor, where the launch reads it."""
    return launch.terms._replace(sinks=sinks) if launch.terms.HAS_SINKS else launch.terms


def _launch_forward(plan: ForwardPlan, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, out, lse, sinks):
    kpm, kpm_strides = _mask_args(key_padding_mask, q)
    launch = plan.forward
    prefix_attention_fwd_kernel[launch.grid](
        q, k, v, prefix_k, prefix_v, _prefix_ids_arg(prefix_ids, q), kpm, out, lse,
        q.stride(), k.stride(), v.stride(), prefix_k.stride(), prefix_v.stride(), kpm_strides, out.stride(),
        lse.stride()[:2],
        terms=_terms(launch, sinks), **launch.args, **launch.options,
    )


def prefix_attention_decode(plan: DecodePlan, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, out, lse,
                            sinks=None):
    """The split-KV decode forward (kernels/decode.py) into ``out`` and ``lse`` (log2 units), as
    ``plan`` lists it: one split: the per-row kernel writes out/lse itself; several: fp32 partials
    [B, Hq, N, splits, Dv] (+ m, l) that the combine kernel merges; with the cascade the prefix
    kernel writes the first ``plan.split_base`` splits of them."""
    if plan.splits > 1:
        acc_part = torch.empty(plan.partials_shape, device=q.device, dtype=torch.float32)
        ml_part = torch.empty(plan.ml_shape, device=q.device, dtype=torch.float32)
        m_part, l_part = ml_part[0], ml_part[1]
    else:
        acc_part = m_part = l_part = lse  # never read: SPLIT is False
    ids = _prefix_ids_arg(prefix_ids, q)
    if plan.cascade:
        launch = plan.shared_prefix
        bank = {} if not launch.args.get("HAS_PREFIX_IDS") else dict(
            PREFIX_IDS=ids, stride_pkt=prefix_k.stride(0), stride_pvt=prefix_v.stride(0))
        prefix_attention_shared_prefix_kernel[launch.grid](
            q, prefix_k, prefix_v, acc_part, m_part, l_part, q.stride(), prefix_k.stride()[1:],
            prefix_v.stride()[1:], terms=_terms(launch, sinks), **launch.args, **launch.options, **bank)
    kpm, kpm_strides = _mask_args(key_padding_mask, q)
    launch = plan.rows
    prefix_attention_decode_kernel[launch.grid](
        q, k, v, prefix_k, prefix_v, ids, kpm, out, lse, acc_part, m_part, l_part,
        q.stride(), k.stride(), v.stride(), prefix_k.stride(), prefix_v.stride(), kpm_strides, out.stride(),
        lse.stride()[:2],
        terms=_terms(launch, sinks), **launch.args, **launch.options,
    )
    if plan.combine is not None:
        launch = plan.combine
        prefix_attention_decode_combine_kernel[launch.grid](
            acc_part, m_part, l_part, out, lse, out.stride(), lse.stride()[:2],
            **launch.args, **launch.options)
    return out, lse


def prefix_attention_backward(
    grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_ids, causal, scale,
    *, need_dq: bool, need_dkdv: bool, need_dprefix: bool, deterministic: bool, contiguous_grads: bool = False,
    sliding_window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
    need_dsinks: bool = False, device: DeviceProps | None = None,
):
    """Returns (dq, dk, dv, dprefix_k, dprefix_v, dsinks); a gradient not asked for is None and no
    kernel computes it. dprefix_* have prefix_k's [T, Hkv, P, D] shape and dtype, dsinks sinks'.

    Launches (kernels/backward.py, as :func:`plan.plan_backward` lists them): the prologue (delta,
    zeroed accumulators), the one-pass kernel, and the epilogue when an fp32 accumulator must become
    a 16-bit gradient (or chunk partials be summed); deterministic mode adds the dq pass. Nothing
    else touches device memory."""
    nothing_to_do = q.numel() == 0  # no query: every gradient is zero
    dq = _new_like(q, contiguous_grads, nothing_to_do) if need_dq else None
    dk = _new_like(k, contiguous_grads, nothing_to_do) if need_dkdv else None
    dv = _new_like(v, contiguous_grads, nothing_to_do) if need_dkdv else None
    dpk = dpv = None
    if need_dprefix and (prefix_k.shape[2] == 0 or nothing_to_do):  # P = 0: an empty gradient; no query: zeros
        dpk, dpv, need_dprefix = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v), False
    need_dsinks = need_dsinks and sinks is not None
    dsinks = torch.zeros_like(sinks) if need_dsinks and nothing_to_do else None
    if nothing_to_do or not (need_dq or need_dkdv or need_dprefix or need_dsinks):
        return dq, dk, dv, dpk, dpv, dsinks
    needs = Needs(dq=need_dq, dkdv=need_dkdv, dprefix=need_dprefix, dsinks=need_dsinks, deterministic=deterministic)
    plan = plan_backward(problem(q, k, v, prefix_k, key_padding_mask, prefix_ids, causal, scale, sliding_window,
                                 softcap, sinks), needs, device or device_props(q.device))
    return _launch_backward(plan, grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_ids,
                            sinks, dq, dk, dv, dpk, dpv)


def _launch_backward(plan: BackwardPlan, grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask,
                     prefix_ids, sinks, dq, dk, dv, dpk, dpv):
    """Allocates the plan's buffers and launches its kernels; returns the six gradients."""
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq_acc = None
    if plan.dq_atomic:
        dq_acc = torch.empty(q.shape, device=q.device, dtype=acc_dtype) if plan.dq_acc else dq
    dpk_acc = dpv_acc = q  # never read unless the prefix gradients are needed
    if plan.prefix_acc:  # fp32 accumulators [C, T, Hkv, P, D], zeroed by the prologue
        dpk_acc = torch.empty((plan.prefix_acc, *prefix_k.shape), device=q.device, dtype=acc_dtype)
        dpv_acc = torch.empty((plan.prefix_acc, *prefix_v.shape), device=q.device, dtype=acc_dtype)
    delta = torch.empty(q.shape[:3], device=q.device, dtype=acc_dtype)
    lse = lse.contiguous()
    dsinks = dsink_part = None
    if plan.dsink_parts:  # per (row, head, query block) partials of the sink gradient, summed by the epilogue
        sinks = sinks.contiguous()  # read and written at SINKS + h / DSINKS + h
        dsinks = torch.empty(sinks.shape, device=sinks.device, dtype=sinks.dtype)
        dsink_part = torch.empty(plan.dsink_parts, device=q.device, dtype=torch.float32)
    dqz = dq_acc if plan.dq_atomic else q
    launch = plan.prologue
    backward_prologue_kernel[launch.grid](
        out, grad_out, delta, dqz, dpk_acc, dpv_acc, out.stride(), grad_out.stride(), dqz.stride(),
        **launch.args, **launch.options, **({} if dsink_part is None else dict(LSE=lse, SINKS=sinks,
                                                                                DSINK_PART=dsink_part)))
    kpm, kpm_strides = _mask_args(key_padding_mask, q)
    ids = _prefix_ids_arg(prefix_ids, q)
    if plan.dq is not None:
        launch = plan.dq
        dq_kernel[launch.grid](
            q, k, v, prefix_k, prefix_v, ids, kpm, grad_out, lse, delta, dq,
            q.stride(), k.stride(), v.stride(), prefix_k.stride(), prefix_v.stride(), kpm_strides, grad_out.stride(),
            dq.stride(), terms=launch.terms, **launch.args, **launch.options)
    if plan.main is not None:
        launch = plan.main
        dqa = dq_acc if plan.dq_atomic else q
        dka, dva = (dk, dv) if plan.needs.dkdv else (k, v)
        gstride = dpk_acc.stride()[:4] if plan.prefix_acc else (0, 0, 0, 0)  # (chunk, t, kv head, key)
        gstride_v = dpv_acc.stride()[:4] if plan.prefix_acc else (0, 0, 0, 0)
        backward_kernel[launch.grid](
            q, k, v, prefix_k, prefix_v, ids, kpm, grad_out, lse, delta, dqa, dka, dva, dpk_acc, dpv_acc,
            q.stride(), k.stride(), v.stride(), prefix_k.stride(), prefix_v.stride(), kpm_strides, grad_out.stride(),
            dqa.stride(), dka.stride(), dva.stride(), gstride, gstride_v, terms=launch.terms,
            **launch.args, **launch.options)
    if plan.prefix_acc and not plan.convert_dprefix:
        dpk, dpv = dpk_acc[0], dpv_acc[0]  # the fp32/fp64 accumulators are the gradients
    elif plan.prefix_acc:
        # contiguous (not empty_like, which keeps a permuted prefix's strides): the epilogue writes flat offsets
        dpk, dpv = (torch.empty(p.shape, device=p.device, dtype=p.dtype) for p in (prefix_k, prefix_v))
    if plan.epilogue is not None:
        launch = plan.epilogue
        dqc, dqo = (dq_acc, dq) if plan.convert_dq else (q, q)
        backward_epilogue_kernel[launch.grid](
            dqc, dqo, dpk_acc, dpv_acc, dpk if plan.convert_dprefix else q, dpv if plan.convert_dprefix else q,
            dqc.stride(), dqo.stride(), **launch.args, **launch.options,
            **({} if dsink_part is None else dict(DSINK_PART=dsink_part, DSINKS=dsinks)))
    return dq, dk, dv, dpk, dpv, dsinks
