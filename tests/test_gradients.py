"""Which gradients are computed (and which kernels run), determinism, gradcheck, block-size stress."""

from __future__ import annotations

import pytest
import torch

import prefix_kernels.ops as ops
from helpers import DEVICE, ON_GPU, Case, check_against_reference, requires_triton
from prefix_kernels import prefix_attention, prefix_attention_reference
from prefix_kernels.kernels.configs import BlockConfig, KernelConfigs, override_configs


def triton_op(*args, **kwargs):
    return prefix_attention(*args, backend="triton", **kwargs)


# Which kernels run for which gradients: tests/test_backward.py.


@requires_triton
def test_inference_launches_no_backward_and_keeps_no_graph(monkeypatch):
    q, k, v, pk, pv, _, _ = Case().on_device().make(torch.float32)
    with torch.no_grad():
        out = triton_op(q, k, v, pk, pv)
    assert out.grad_fn is None


@requires_triton
@pytest.mark.parametrize("n_prefixes", [None, 3])
def test_deterministic_gradients_are_bit_identical(n_prefixes):
    case = Case(batch=4, n_prefixes=n_prefixes, n_queries=40, n_keys=40, padding="right").on_device()
    q, k, v, pk, pv, mask, ids = case.make(torch.float16 if ON_GPU else torch.float32)
    grad = torch.randn(q.shape, device=DEVICE, dtype=q.dtype)
    runs = []
    for _ in range(3):
        out = triton_op(q, k, v, pk, pv, key_padding_mask=mask, prefix_ids=ids, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v, pk, pv), grad))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@requires_triton
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("n_sms", [1, 3, 64])
def test_prefix_gradients_reduced_over_chunks(monkeypatch, deterministic, n_sms):
    """1 SM: two chunks of six work items that cross rows and prefixes (in-loop flushes); 3: chunks
    that start mid-row; 64: one item per chunk."""
    monkeypatch.setattr(ops, "_num_sms", lambda device: n_sms)
    case = Case(batch=6, heads=4, kv_heads=2, n_prefixes=3, n_queries=20, n_keys=20, n_prefix=5)

    def op(*args, **kwargs):
        return triton_op(*args, deterministic=deterministic, **kwargs)

    check_against_reference(op, case.on_device(), torch.float32)


TINY_BLOCKS = [
    KernelConfigs(BlockConfig(16, 16), BlockConfig(16, 16), BlockConfig(16, 16)),
    KernelConfigs(BlockConfig(16, 32), BlockConfig(32, 16), BlockConfig(16, 32)),
]


@requires_triton
@pytest.mark.parametrize("configs", TINY_BLOCKS, ids=["16x16", "mixed"])
@pytest.mark.parametrize(
    "case",
    [
        Case(batch=1, heads=2, kv_heads=1, n_queries=45, n_keys=77, n_prefix=37, padding="left"),
        Case(batch=3, heads=2, kv_heads=1, n_queries=50, n_keys=50, n_prefix=21, n_prefixes=2, causal=False,
             padding="right"),
    ],
    ids=["cache_P37", "bank_noncausal"],
)
def test_many_blocks_per_program(monkeypatch, configs, case):
    """Small blocks: several unmasked prefix and sequence blocks, diagonal blocks, ragged tails."""
    if ON_GPU:
        pytest.skip("block-size override is an interpreter check; CUDA runs the real configs")
    with override_configs(forward=configs.forward, dq=configs.dq, backward=configs.backward):
        check_against_reference(triton_op, case, torch.float32)


def _gradcheck_inputs(case):
    q, k, v, pk, pv, mask, ids = case.make(torch.float64)
    return (q, k, v, pk, pv), dict(key_padding_mask=mask, prefix_ids=ids)


GRADCHECK_CASE = Case(batch=2, heads=2, kv_heads=1, n_queries=3, n_keys=5, n_prefix=2, head_dim=16,
                      n_prefixes=2, padding="left")


def test_gradcheck_reference():
    tensors, kwargs = _gradcheck_inputs(GRADCHECK_CASE)
    torch.autograd.gradcheck(lambda *t: prefix_attention_reference(*t, **kwargs)[0], tensors)


@requires_triton
def test_gradcheck_triton_wrapper():
    """float64 through the Triton kernels (fp64 accumulation). Fast mode under the interpreter."""
    tensors, kwargs = _gradcheck_inputs(GRADCHECK_CASE)
    torch.autograd.gradcheck(lambda *t: triton_op(*t, **kwargs), tensors, fast_mode=not ON_GPU)


def _double_backward_problem():
    case = Case(batch=1, heads=2, kv_heads=1, n_queries=4, n_keys=6, n_prefix=2, head_dim=8, with_ids=False)
    q, k, v, pk, pv, _, _ = case.make(torch.float64, "cpu")
    return [t.detach() for t in (q, k, v, pk, pv)]


def _first_order_with_graph(op, x, w, rest):
    out = op(x * w, *rest)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return g


@pytest.mark.parametrize("entry", ["cpu", "triton", "triton_registered_op"])
def test_double_backward_is_refused_not_wrong(entry):
    """Differentiating the gradient of the C++ or Triton op (create_graph=True, then backward again)
    raises an error that says so and names backend='reference'; it never returns a partial second
    derivative. The first-order gradient taken with create_graph=True is still exact."""
    from helpers import need

    need("cpu" if entry == "cpu" else "triton")
    q, k, v, pk, pv = _double_backward_problem()
    if entry == "triton_registered_op":
        from prefix_kernels import autograd  # noqa: F401 -- registers the op

        def op(x, *rest):
            return torch.ops.prefix_kernels.triton_fwd(x, *rest, None, None, True, 8 ** -0.5, False)[0]
    else:
        def op(x, *rest):
            return prefix_attention(x, *rest, backend=entry)
    device = DEVICE if entry != "cpu" else torch.device("cpu")
    q, k, v, pk, pv = (t.to(device) for t in (q, k, v, pk, pv))
    x = q.clone().requires_grad_()
    w = torch.tensor(1.3, dtype=torch.float64, device=device, requires_grad=True)
    g = _first_order_with_graph(op, x, w, (k, v, pk, pv))
    x_ref = q.clone().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    g_ref = _first_order_with_graph(lambda *t: prefix_attention_reference(*t)[0], x_ref, w_ref, (k, v, pk, pv))
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"double backward is not supported.*backend='reference'"):
        (g ** 2).sum().backward()
    assert w.grad is None


def test_reference_supports_double_backward():
    """The reference is plain PyTorch: its second derivatives pass gradgradcheck (finite differences),
    with sinks and a softcap too."""
    q, k, v, pk, pv = (t.requires_grad_() for t in _double_backward_problem())
    sinks = torch.randn(2, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)

    def f(q, k, v, pk, pv, sinks):
        return prefix_attention(q, k, v, pk, pv, sinks=sinks, softcap=3.0, backend="reference")

    torch.autograd.gradgradcheck(f, (q, k, v, pk, pv, sinks))
