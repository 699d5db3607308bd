"""The autograd Function around the Triton launchers: saves LSE, computes only needed gradients."""

from __future__ import annotations

import torch
from torch.profiler import record_function

from prefix_kernels import ops


class PrefixAttentionFunction(torch.autograd.Function):
    """apply(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, deterministic)
    -> (out, lse). lse is not differentiable. A [Hkv, P, D] prefix is viewed as [1, Hkv, P, D]."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, deterministic):
        shared = prefix_k.dim() == 3
        pk = prefix_k.unsqueeze(0) if shared else prefix_k
        pv = prefix_v.unsqueeze(0) if shared else prefix_v
        with record_function("prefix_kernels::forward"):  # a profiler range (NVTX under emit_nvtx)
            out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, key_padding_mask, prefix_ids, causal, scale)
        ctx.save_for_backward(q, k, v, pk, pv, out, lse, key_padding_mask, prefix_ids)
        ctx.causal, ctx.scale, ctx.deterministic, ctx.shared = causal, scale, deterministic, shared
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, pk, pv, out, lse, key_padding_mask, prefix_ids = ctx.saved_tensors
        need = ctx.needs_input_grad
        with record_function("prefix_kernels::backward"):
            dq, dk, dv, dpk, dpv = ops.prefix_attention_backward(
                grad_out, q, k, v, pk, pv, out, lse, key_padding_mask, prefix_ids, ctx.causal, ctx.scale,
                need_dq=need[0], need_dkdv=need[1] or need[2], need_dprefix=need[3] or need[4],
                deterministic=ctx.deterministic,
            )
        if ctx.shared and dpk is not None:
            dpk, dpv = dpk.squeeze(0), dpv.squeeze(0)
        return (
            dq, dk if need[1] else None, dv if need[2] else None,
            dpk if need[3] else None, dpv if need[4] else None, None, None, None, None, None,
        )
