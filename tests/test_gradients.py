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
