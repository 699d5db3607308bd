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

from contextlib import nullcontext

import torch
from torch import Tensor
from torch.profiler import record_function

from prefix_kernels import ops
from prefix_kernels._autograd_common import backward as _common_backward, save as _save


def _as_bank(t: Tensor) -> Tensor:
    return t.unsqueeze(0) if t.dim() == 3 else t  # a shared [Hkv, P, D] prefix is a bank of one


def _profiler_range(name: str):
    """A profiler range (NVTX under emit_nvtx) while a profiler runs. Without one, nothing: an idle
    record_function still costs ~8 us of host time per call (see tests/test_host_overhead.py)."""
    return record_function(name) if torch._C._autograd._profiler_enabled() else nullcontext()


def _forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale,
             sliding_window=None, softcap=None, sinks=None, contiguous=False):
    with _profiler_range("prefix_kernels::forward"):
        return ops.prefix_attention_forward(
            q, k, v, _as_bank(prefix_k), _as_bank(prefix_v), key_padding_mask, prefix_ids, causal, scale,
            contiguous_out=contiguous, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
        )


def _backward(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_ids,
              causal, scale, output_mask, deterministic, sliding_window=None, softcap=None, sinks=None,
              contiguous=False):
    """The gradients of q, k, v, prefix_k, prefix_v (and sinks: a sixth flag in output_mask); None
    where output_mask is False (no kernel computes those)."""
    need_dsinks = len(output_mask) > 5 and output_mask[5]
    with _profiler_range("prefix_kernels::backward"):
        dq, dk, dv, dpk, dpv, dsinks = ops.prefix_attention_backward(
            grad_out, q, k, v, _as_bank(prefix_k), _as_bank(prefix_v), out, lse, key_padding_mask,
            prefix_ids, causal, scale, need_dq=output_mask[0], need_dkdv=output_mask[1] or output_mask[2],
            need_dprefix=output_mask[3] or output_mask[4], deterministic=deterministic,
            contiguous_grads=contiguous, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
            need_dsinks=need_dsinks,
        )
    if dpk is not None and prefix_k.dim() == 3:
        dpk, dpv = dpk.squeeze(0), dpv.squeeze(0)
    grads = (dq, dk, dv, dpk, dpv, dsinks)
    return tuple(g if need else None for g, need in zip(grads, output_mask))


class PrefixAttentionFunction(torch.autograd.Function):
    """apply(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, deterministic,
    sliding_window, softcap, sinks) -> (out, lse in log2 units)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, deterministic,
                sliding_window=None, softcap=None, sinks=None):
        out, lse = _forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale,
                            sliding_window, softcap, sinks)
        _save(ctx, (q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, deterministic,
                    sliding_window, softcap, sinks), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        return _common_backward(ctx, grad_out, _backward)


# ---------------------------------------------------------------- the same, as registered ops

@torch.library.custom_op("prefix_kernels::triton_fwd", mutates_args=())
def triton_fwd(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
               key_padding_mask: Tensor | None, prefix_ids: Tensor | None, causal: bool, scale: float,
               deterministic: bool, sliding_window: int | None = None, softcap: float | None = None,
               sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out, lse in log2 units). ``deterministic`` only affects the backward."""
    if prefix_ids is not None and prefix_ids.device.type == "cpu" and prefix_ids.numel():
        # Under torch.compile the caller cannot check the range without a graph break; on CPU (the
        # interpreter) it costs nothing here. CUDA: the caller's device-side assert.
        n_prefixes = prefix_k.shape[0] if prefix_k.dim() == 4 else 1
        if int(prefix_ids.min()) < 0 or int(prefix_ids.max()) >= n_prefixes:
            raise RuntimeError(f"prefix_ids must be in [0, T={n_prefixes})")
    return _forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale,
                    sliding_window, softcap, sinks, contiguous=True)


@triton_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, deterministic,
      sliding_window=None, softcap=None, sinks=None):
    return q.new_empty((*q.shape[:3], v.shape[3])), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("prefix_kernels::triton_bwd", mutates_args=())
def triton_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
               out: Tensor, lse: Tensor, key_padding_mask: Tensor | None, prefix_ids: Tensor | None,
               causal: bool, scale: float, output_mask: list[bool], deterministic: bool,
               sliding_window: int | None = None, softcap: float | None = None,
               sinks: Tensor | None = None) -> list[Tensor]:
    """[dq, dk, dv, dprefix_k, dprefix_v(, dsinks)]; an empty [0] tensor where output_mask is False."""
    grads = _backward(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_ids,
                      causal, scale, output_mask, deterministic, sliding_window, softcap, sinks, contiguous=True)
    return [q.new_empty((0,)) if g is None else g.contiguous() for g in grads]


@triton_bwd.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_ids, causal, scale,
      output_mask, deterministic, sliding_window=None, softcap=None, sinks=None):
    like = (q, k, v, prefix_k, prefix_v, sinks)
    return [t.new_empty(t.shape) if need else q.new_empty((0,)) for t, need in zip(like, output_mask)]


def _op_backward(ctx, grad_out, _grad_lse):
    return _common_backward(ctx, grad_out, torch.ops.prefix_kernels.triton_bwd)


triton_fwd.register_autograd(_op_backward, setup_context=_save)
