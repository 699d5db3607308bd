"""The autograd bookkeeping the two backends share (Triton: autograd.py, C++: cpu.py).

Both forwards take ``(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale,
*extra)`` and return ``(out, lse)``, lse not differentiable. Both backwards are one call of
``bwd(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_ids, causal, scale,
output_mask, *extra)`` for exactly the gradients autograd needs. :func:`save` is a valid
``setup_context`` (``torch.library.register_autograd``, ``torch.autograd.Function``);
:func:`backward` gives the gradient of every forward input.
"""

from __future__ import annotations

N_GRADS = 5  # q, k, v, prefix_k, prefix_v; the inputs after them get no gradient


def save(ctx, inputs, output) -> None:
    """Saves the tensor inputs, out and lse for :func:`backward`; lse is marked non-differentiable."""
    q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, *extra = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_ids)
    ctx.causal, ctx.scale, ctx.extra = causal, scale, tuple(extra)
    ctx.set_materialize_grads(False)  # no zero tensor for lse's gradient (nor for an unused out)
    ctx.mark_non_differentiable(lse)


def backward(ctx, grad_out, bwd) -> tuple:
    """One gradient per forward input: bwd's for the first five where needed, else None."""
    mask = [bool(need) for need in ctx.needs_input_grad[:N_GRADS]]
    rest = (None,) * (len(ctx.needs_input_grad) - N_GRADS)
    if grad_out is None or not any(mask):  # grad_out None: out was not used, every gradient is zero
        return (None,) * N_GRADS + rest
    grads = bwd(grad_out, *ctx.saved_tensors, ctx.causal, ctx.scale, mask, *ctx.extra)
    return tuple(g if need else None for g, need in zip(grads, mask)) + rest
