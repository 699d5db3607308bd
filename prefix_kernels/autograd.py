"""Autograd for the Triton launchers: saves the LSE, computes only the gradients that are needed.

Two entry points, one backward:
- :class:`PrefixAttentionFunction` (eager): calls the launchers directly, no dispatcher in between
  (host time matters: a training step of a small model is launch-bound).
- ``torch.ops.prefix_kernels.triton_fwd`` / ``triton_bwd``: the same launchers as
  ``torch.library.custom_op`` with fake implementations and a registered autograd formula, which
  ``torch.compile`` traces as single nodes (no graph break) and ``torch.library.opcheck`` checks.
  ``functional.prefix_attention`` takes this path while compiling. Their outputs are contiguous
  (the fake implementations must state the layout without the real strides).

The lse returned by both is in log2 units (see ops.prefix_attention_forward) and not differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.profiler import record_function

from prefix_kernels import ops
from prefix_kernels._autograd_common import backward as _common_backward, save as _save


def _as_bank(t: Tensor) -> Tensor:
    return t.unsqueeze(0) if t.dim() == 3 else t  # a shared [Hkv, P, D] prefix is a bank of one


def _forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, contiguous=False):
    with record_function("prefix_kernels::forward"):  # a profiler range (NVTX under emit_nvtx)
        return ops.prefix_attention_forward(
            q, k, v, _as_bank(prefix_k), _as_bank(prefix_v), key_padding_mask, prefix_ids, causal, scale,
            contiguous_out=contiguous,
        )


def _backward(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_ids,
              causal, scale, output_mask, deterministic, contiguous=False):
    """The five gradients; None where output_mask is False (no kernel runs for those)."""
    with record_function("prefix_kernels::backward"):
        dq, dk, dv, dpk, dpv = ops.prefix_attention_backward(
            grad_out, q, k, v, _as_bank(prefix_k), _as_bank(prefix_v), out, lse, key_padding_mask,
            prefix_ids, causal, scale, need_dq=output_mask[0], need_dkdv=output_mask[1] or output_mask[2],
            need_dprefix=output_mask[3] or output_mask[4], deterministic=deterministic,
            contiguous_grads=contiguous,
        )
    if dpk is not None and prefix_k.dim() == 3:
        dpk, dpv = dpk.squeeze(0), dpv.squeeze(0)
    grads = (dq, dk, dv, dpk, dpv)
    return tuple(g if need else None for g, need in zip(grads, output_mask))


class PrefixAttentionFunction(torch.autograd.Function):
    """apply(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, deterministic)
    -> (out, lse in log2 units)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, deterministic):
        out, lse = _forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale)
        _save(ctx, (q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, deterministic),
              (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        return _common_backward(ctx, grad_out, _backward)


# ---------------------------------------------------------------- the same, as registered ops

@torch.library.custom_op("prefix_kernels::triton_fwd", mutates_args=())
def triton_fwd(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
               key_padding_mask: Tensor | None, prefix_ids: Tensor | None, causal: bool, scale: float,
               deterministic: bool) -> tuple[Tensor, Tensor]:
    """(out, lse in log2 units). ``deterministic`` only affects the backward."""
    if prefix_ids is not None and prefix_ids.device.type == "cpu" and prefix_ids.numel():
        # Under torch.compile the caller cannot check the range without a graph break; on CPU (the
        # interpreter) it costs nothing here. CUDA: the caller's device-side assert.
        n_prefixes = prefix_k.shape[0] if prefix_k.dim() == 4 else 1
        if int(prefix_ids.min()) < 0 or int(prefix_ids.max()) >= n_prefixes:
            raise RuntimeError(f"prefix_ids must be in [0, T={n_prefixes})")
    return _forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, contiguous=True)


@triton_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, deterministic):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("prefix_kernels::triton_bwd", mutates_args=())
def triton_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
               out: Tensor, lse: Tensor, key_padding_mask: Tensor | None, prefix_ids: Tensor | None,
               causal: bool, scale: float, output_mask: list[bool], deterministic: bool) -> list[Tensor]:
    """[dq, dk, dv, dprefix_k, dprefix_v]; an empty [0] tensor where output_mask is False."""
    grads = _backward(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_ids,
                      causal, scale, output_mask, deterministic, contiguous=True)
    return [q.new_empty((0,)) if g is None else g.contiguous() for g in grads]


@triton_bwd.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_ids, causal, scale,
      output_mask, deterministic):
    like = (q, k, v, prefix_k, prefix_v)
    return [t.new_empty(t.shape) if need else q.new_empty((0,)) for t, need in zip(like, output_mask)]


def _op_backward(ctx, grad_out, _grad_lse):
    return _common_backward(ctx, grad_out, torch.ops.prefix_kernels.triton_bwd)


triton_fwd.register_autograd(_op_backward, setup_context=_save)
