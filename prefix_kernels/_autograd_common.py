"""The autograd bookkeeping the two backends share (Triton: autograd.py, C++: cpu.py).

Both forwards take ``(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale,
*extra)`` and return ``(out, lse)``, lse not differentiable. Both backwards are one call of
``bwd(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_ids, causal, scale,
output_mask, *extra)`` for exactly the gradients autograd needs. :func:`save` is a valid
``setup_context`` (``torch.library.register_autograd``, ``torch.autograd.Function``);
:func:`backward` gives the gradient of every forward input.

Differentiable inputs: q, k, v, prefix_k, prefix_v, and every tensor among ``extra`` (the C++ op's
``sinks``; None and non-tensor extras get no gradient). ``output_mask`` holds one flag per
differentiable input, in input order (5 when no extra is a tensor), and ``bwd`` returns one
gradient per flag (any value where the flag is False).
"""

from __future__ import annotations

import torch

N_GRADS = 5  # q, k, v, prefix_k, prefix_v: the first inputs, always differentiable
N_FIXED = 9  # q .. scale: the inputs before the extras


def save(ctx, inputs, output) -> None:
    """Saves the tensor inputs, out and lse for :func:`backward`; lse is marked non-differentiable."""
    q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, *extra = inputs
    out, lse = output
    tensor_extras = [i for i, x in enumerate(extra) if isinstance(x, torch.Tensor)]
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_ids,
                          *(extra[i] for i in tensor_extras))
    ctx.causal, ctx.scale = causal, scale
    ctx.extra = tuple(None if i in tensor_extras else x for i, x in enumerate(extra))  # tensors: saved
    ctx.tensor_extras = tuple(tensor_extras)
    ctx.set_materialize_grads(False)  # no zero tensor for lse's gradient (nor for an unused out)
    ctx.mark_non_differentiable(lse)


def backward(ctx, grad_out, bwd) -> tuple:
    """One gradient per forward input: bwd's where needed (q .. prefix_v, tensor extras), else None."""
    grad_at = list(range(N_GRADS)) + [N_FIXED + i for i in ctx.tensor_extras]
    mask = [bool(ctx.needs_input_grad[i]) for i in grad_at]
    result = [None] * len(ctx.needs_input_grad)
    if grad_out is None or not any(mask):  # grad_out None: out was not used, every gradient is zero
        return tuple(result)
    saved = ctx.saved_tensors
    extra = list(ctx.extra)
    for i, t in zip(ctx.tensor_extras, saved[N_FIXED:]):
        extra[i] = t
    if not torch.is_grad_enabled():
        grads = bwd(grad_out, *saved[:N_FIXED], ctx.causal, ctx.scale, mask, *extra)
    else:
        # create_graph=True: the kernels' gradients are not differentiable themselves. Computing them
        # under grad mode would hand autograd a partial graph (a silently wrong second derivative).
        with torch.no_grad():
            grads = bwd(grad_out, *saved[:N_FIXED], ctx.causal, ctx.scale, mask, *extra)
        grads = _refuse_double_backward(grads, mask, grad_out, saved)
    for i, g, need in zip(grad_at, grads, mask):
        if need:
            result[i] = g
    return tuple(result)


DOUBLE_BACKWARD_MESSAGE = (
    "prefix_attention: double backward is not supported by the 'triton' and 'cpu' backends (their "
    "gradients were taken with create_graph=True and are now being differentiated again); use "
    "backend='reference' for higher-order gradients (gradient penalties, Hessian-vector products)"
)


def _refuse_double_backward(grads, mask, grad_out, saved) -> list:
    """The needed gradients, each made to require grad through a node that raises
    DOUBLE_BACKWARD_MESSAGE when autograd reaches it (what torch.autograd.function.once_differentiable
    does, with a message that names the way out). Unchanged when nothing upstream requires grad."""
    upstream = [grad_out, *saved]
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in upstream):
        return list(grads)
    grads = list(grads)
    at = [i for i, need in enumerate(mask) if need and isinstance(grads[i], torch.Tensor)]
    if not at:
        return grads
    err_fn = torch._C._functions.DelayedError(DOUBLE_BACKWARD_MESSAGE.encode(), len(at))
    wrapped = err_fn(*[grads[i].detach().requires_grad_() for i in at])
    if not isinstance(wrapped, tuple):
        wrapped = (wrapped,)
    for i, g in zip(at, wrapped):
        grads[i] = g
    return grads
