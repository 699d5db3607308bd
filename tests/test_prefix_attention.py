"""The Triton op against the fp64 reference over the core matrix (interpreter on CPU, full size on CUDA)."""

from __future__ import annotations

import pytest
import torch

from helpers import DEVICE, Case, check_against_reference, requires_triton
from prefix_kernels import prefix_attention

CASES = {
    "base": Case(),
    "decode_N1_mqa": Case(heads=4, kv_heads=1, n_queries=1, n_keys=40, n_prefix=5),
    "N113_gqa4_P37": Case(batch=1, heads=8, kv_heads=2, n_queries=113, n_keys=113, n_prefix=37, gpu_scale=4),
    "cache_M_gt_N": Case(n_queries=20, n_keys=70, n_prefix=3),
    "P0_left_pad": Case(n_prefix=0, padding="left", n_keys=24, n_queries=24),
    "P1_right_pad": Case(n_prefix=1, padding="right", n_keys=24, n_queries=24),
    "prefix_ids_T3": Case(batch=4, n_prefixes=3, n_prefix=5, heads=4, kv_heads=2),
    "strided": Case(strided=True, padding="left", n_keys=30, n_queries=22, n_prefix=6),
    "non_causal": Case(causal=False, n_queries=9, n_keys=30, padding="right"),
    "head_dim_80": Case(head_dim=80, n_prefix=7, n_queries=18, n_keys=18),
}
LOW_PRECISION = ["base", "N113_gqa4_P37", "prefix_ids_T3", "strided", "P0_left_pad"]


def triton_op(*args, **kwargs):
    return prefix_attention(*args, backend="triton", **kwargs)


@requires_triton
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp32(name):
    check_against_reference(triton_op, CASES[name].on_device(), torch.float32)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", LOW_PRECISION)
def test_matches_reference_16bit(name, dtype):
    check_against_reference(triton_op, CASES[name].on_device(), dtype)


@requires_triton
def test_fully_masked_rows_give_zero_and_no_nan():
    """P = 0 and left padding: the first queries of row 0 see no key at all."""
    case = Case(batch=2, n_prefix=0, n_queries=12, n_keys=12, padding="left").on_device()
    q, k, v, pk, pv, mask, _ = case.make(torch.float32)
    mask[0] = torch.arange(case.n_keys, device=DEVICE) >= case.n_keys // 2
    mask[1] = True
    out, lse = triton_op(q, k, v, pk, pv, key_padding_mask=mask, return_lse=True)
    dead = slice(0, case.n_keys // 2)
    assert torch.all(out[0, :, dead] == 0) and torch.all(lse[0, :, dead] == float("-inf"))
    assert torch.isfinite(out).all() and torch.isfinite(lse[1]).all()
    dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.all(dq[0, :, dead] == 0)
    assert torch.all(dk[0, :, dead] == 0) and torch.all(dv[0, :, dead] == 0)  # padded keys


@requires_triton
def test_output_keeps_q_layout():
    """HF hands q as a transposed view of [B, N, H, D]: out has the same layout, so out.transpose(1, 2)
    is contiguous and needs no copy."""
    q, k, v, pk, pv, _, _ = Case(strided=True).on_device().make(torch.float32)
    out = triton_op(q, k, v, pk, pv)
    assert out.stride() == q.stride()
    assert out.transpose(1, 2).is_contiguous()


@requires_triton
def test_shared_prefix_equals_bank_of_one():
    case = Case(batch=3).on_device()
    q, k, v, pk, pv, _, _ = case.make(torch.float32)
    shared = triton_op(q, k, v, pk, pv)
    ids = torch.zeros(case.batch, dtype=torch.long, device=DEVICE)
    banked = triton_op(q, k, v, pk[None], pv[None], prefix_ids=ids)
    assert torch.equal(shared, banked)


@requires_triton
def test_no_queries_and_no_batch():
    for case in (Case(batch=0), Case(n_queries=0, n_keys=5, causal=False)):
        q, k, v, pk, pv, _, _ = case.make(torch.float32)
        out, lse = triton_op(q, k, v, pk, pv, causal=case.causal, return_lse=True)
        assert out.shape == q.shape and lse.shape == q.shape[:3]
        grads = torch.autograd.grad(out.sum(), (q, k, v, pk, pv), allow_unused=True)
        for g, t in zip(grads, (q, k, v, pk, pv)):
            assert g is None or (g.shape == t.shape and not g.any())
