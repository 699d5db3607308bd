"""The correctness gate the kernel benchmark runs before it times a provider on a shape.

The provider's output (and, for training shapes, the gradients of q, k, v, prefix_k, prefix_v) on a
cut-down version of the shape (B <= 2, N <= 256, at most 512 cached keys; heads, P and D kept;
:meth:`Shape.cut_down`) is compared with ``prefix_attention_reference`` in fp32 (for the floor: the
reference with an empty prefix), both with the shape's sliding window (cut down too). Error = max |got - want| / max(1, max |want|), per tensor;
tolerance ``TOLERANCE[dtype]`` (gradients: twice that). A provider that fails the check gives error
rows for that shape and is not timed.
"""

from __future__ import annotations

import torch

from prefix_kernels.benchmarking.providers import Provider
from prefix_kernels.benchmarking.shapes import Shape, make_inputs
from prefix_kernels.reference import prefix_attention_reference

# max relative error of the output (gradients: 2x) against the fp32 reference, by input dtype
TOLERANCE = {torch.float32: 2e-3, torch.float64: 1e-6, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def check_provider(provider: Provider, shape: Shape, dtype: torch.dtype, device: torch.device | str,
                   *, cut_down: bool = True) -> float:
    """Worst relative error against the fp32 reference on the cut-down shape (output, and the five
    gradients for training shapes); raises AssertionError above tolerance."""
    small = shape.cut_down() if cut_down else shape
    train = small.kind == "training"
    inputs = make_inputs(small, dtype, device, requires_grad=train, seed=1)
    ref_inputs = [t.detach().float().requires_grad_(train) for t in inputs]
    if not provider.uses_prefix:  # the floor: no prefix at all
        ref_inputs[3] = ref_inputs[3][:, :0].detach().requires_grad_(train)
        ref_inputs[4] = ref_inputs[4][:, :0].detach().requires_grad_(train)
    out = provider.call(inputs, small.W)
    ref, _ = prefix_attention_reference(*ref_inputs, causal=True, sliding_window=small.W)
    tol = TOLERANCE.get(dtype, 3e-2)

    def rel(got, want):
        want = want.float()
        return (got.float() - want).abs().max().item() / max(1.0, want.abs().max().item()) if want.numel() else 0.0

    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"output shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    errs = {"out": rel(out, ref)}
    failed = [] if errs["out"] <= tol else [f"out {errs['out']:.2e} > {tol:.0e}"]
    if train:
        grad = torch.randn(out.shape, dtype=dtype, device=out.device, generator=torch.Generator(out.device).manual_seed(2))
        names = ("dq", "dk", "dv", "dprefix_k", "dprefix_v")
        n = 5 if provider.uses_prefix else 3
        got = torch.autograd.grad(out, inputs[:n], grad, allow_unused=True)
        want = torch.autograd.grad(ref, ref_inputs[:n], grad.float(), allow_unused=True)
        for name, g, w in zip(names, got, want):
            if g is None:
                failed.append(f"{name} missing")
                continue
            errs[name] = rel(g, w)
            if not errs[name] <= 2 * tol:
                failed.append(f"{name} {errs[name]:.2e} > {2 * tol:.0e}")
    if failed:
        raise AssertionError(f"{small.name}: " + ", ".join(failed))
    return max(errs.values())
