"""The split-KV decode forward (kernels/decode.py) against the fp64 reference: few queries per row,
GQA/MQA, with and without prefix / cache / padding / causality, one split and several (the combine
kernel), 16-bit dtypes, strided q, NaN propagation, gradients through the op, and the dispatch.

Tiny shapes under the interpreter; on CUDA the key counts are scaled up (``_on_device``) while N and
G stay small, so the same cases take the decode path there too.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import prefix_kernels.ops as ops
from helpers import (
    ATOL, DEVICE, ON_GPU, Case, assert_close_by_rule, check_against_reference, max_err,
    requires_triton,
)
from prefix_kernels import prefix_attention, prefix_attention_reference
from prefix_kernels.kernels import configs
from prefix_kernels.kernels.configs import DecodeConfig, decode_num_splits

pytestmark = [requires_triton,
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def _on_device(case: Case) -> Case:
    """CUDA: longer caches and prefixes, more rows; N and the group size unchanged (decode path)."""
    if not ON_GPU:
        return case
    return replace(case, batch=case.batch * 2, n_keys=case.n_keys * 16 if case.n_keys > 1 else case.n_keys,
                   n_prefix=case.n_prefix * 4)


class Spy:
    """Counts decode launches and records the split counts the plan chose (the per-row kernel's)."""

    def __init__(self, monkeypatch):
        self.calls, self.splits = 0, []
        decode = ops.prefix_attention_decode

        def counted(plan, *args, **kwargs):
            self.calls += 1
            self.splits.append(plan.seq_splits)
            return decode(plan, *args, **kwargs)

        monkeypatch.setattr(ops, "prefix_attention_decode", counted)


def triton_op(*args, **kwargs):
    return prefix_attention(*args, backend="triton", **kwargs)


def check_forward(case: Case, dtype: torch.dtype, seed: int = 0, inputs=None):
    """out (flash-attention's rule against the same-dtype reference) and lse (natural log, relative
    1e-4) against the fp64 reference; -inf rows must match exactly."""
    q, k, v, pk, pv, mask, ids = inputs if inputs is not None else case.make(dtype, seed=seed)
    kwargs = dict(causal=case.causal, key_padding_mask=mask, prefix_ids=ids)
    with torch.no_grad():
        out, lse = triton_op(q, k, v, pk, pv, return_lse=True, **kwargs)
        out64, lse64 = prefix_attention_reference(*(t.double() for t in (q, k, v, pk, pv)), **kwargs)
        out_same, _ = prefix_attention_reference(q, k, v, pk, pv, upcast=False, **kwargs)
    assert out.shape == q.shape and out.dtype == dtype and out.stride() == q.stride()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert_close_by_rule("out", out, out_same, out64, 2, ATOL[dtype])
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf rows differ from the reference"
    assert torch.equal(lse[~finite], lse64[~finite].float())
    if finite.any():
        size = max(1.0, lse64[finite].abs().max().item())
        assert max_err(lse[finite], lse64[finite]) <= 1e-4 * size
    return out, lse


# name: (case, several splits expected)
CASES = {
    "N1_mha_M1_P0": (Case(batch=2, heads=2, kv_heads=2, n_queries=1, n_keys=1, n_prefix=0), False),
    "N1_gqa2_M1_P4": (Case(batch=2, heads=4, kv_heads=2, n_queries=1, n_keys=1, n_prefix=4), False),
    "N1_mqa4_M0_noncausal": (Case(batch=2, heads=4, kv_heads=1, n_queries=1, n_keys=0, n_prefix=5,
                                  causal=False), False),
    "N3_gqa2_M0_bank_noncausal": (Case(batch=3, heads=4, kv_heads=2, n_queries=3, n_keys=0, n_prefix=6,
                                       n_prefixes=3, causal=False), False),
    "N3_mha_short_left_pad": (Case(batch=2, heads=2, kv_heads=2, n_queries=3, n_keys=20, n_prefix=3,
                                   padding="left"), False),
    "N1_gqa4_long": (Case(batch=1, heads=8, kv_heads=2, n_queries=1, n_keys=260, n_prefix=7), True),
    "N1_mha_long_P0_left_pad": (Case(batch=1, heads=2, kv_heads=2, n_queries=1, n_keys=260, n_prefix=0,
                                     padding="left"), True),
    "N3_mqa4_long_bank_left_pad": (Case(batch=2, heads=4, kv_heads=1, n_queries=3, n_keys=260, n_prefix=5,
                                        n_prefixes=3, padding="left"), True),
    "N3_gqa2_long_noncausal_right_pad": (Case(batch=1, heads=4, kv_heads=2, n_queries=3, n_keys=200, n_prefix=2,
                                              causal=False, padding="right"), True),
    "N1_prefix_across_splits": (Case(batch=1, heads=2, kv_heads=1, n_queries=1, n_keys=40, n_prefix=150), True),
    "N3_gqa2_strided_d40": (Case(batch=1, heads=4, kv_heads=2, n_queries=3, n_keys=200, n_prefix=4, head_dim=40,
                                 strided=True, padding="left"), True),
}
LOW_PRECISION = ["N1_gqa2_M1_P4", "N1_gqa4_long", "N3_mqa4_long_bank_left_pad", "N3_gqa2_strided_d40"]


def _check_case(monkeypatch, name, dtype):
    case, several = CASES[name]
    case = _on_device(case)
    spy = Spy(monkeypatch)
    check_forward(case, dtype)
    assert spy.calls == 1, "the decode path was not taken"
    assert (spy.splits[-1] > 1) == several, f"splits {spy.splits}"  # the last: the per-row kernel's


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp32(monkeypatch, name):
    _check_case(monkeypatch, name, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", LOW_PRECISION)
def test_matches_reference_16bit(monkeypatch, name, dtype):
    _check_case(monkeypatch, name, dtype)


@pytest.mark.parametrize("n_keys", [5, 260], ids=["one_split", "splits"])
@pytest.mark.parametrize("n_prefix", [0, 3], ids=["P0", "P3"])
def test_fully_padded_row(monkeypatch, n_keys, n_prefix):
    """Row 0 has every key padded: with P = 0 its queries see nothing (out 0, lse -inf); with a
    prefix they see the prefix only. Row 1 is unpadded."""
    case = _on_device(Case(batch=2, heads=4, kv_heads=2, n_queries=1, n_keys=n_keys, n_prefix=n_prefix))
    q, k, v, pk, pv, _, ids = case.make(torch.float32)
    mask = torch.ones(case.batch, case.n_keys, dtype=torch.bool, device=DEVICE)
    mask[0] = False
    spy = Spy(monkeypatch)
    out, lse = check_forward(case, torch.float32, inputs=(q, k, v, pk, pv, mask, ids))
    assert spy.calls == 1
    if n_prefix == 0:
        assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()
    assert torch.isfinite(lse[1:]).all()


@pytest.mark.parametrize("key", ["early", "last"])
def test_nan_in_k_propagates(monkeypatch, key):
    """A NaN in k of kv head 0, batch row 0: out and lse are NaN for exactly the rows that see that
    key (all queries of heads 0, 1 for an early key; only the last query for key M - 1) and equal the
    reference elsewhere."""
    case = _on_device(Case(batch=2, heads=4, kv_heads=2, n_queries=3, n_keys=200, n_prefix=3))
    q, k, v, pk, pv, mask, ids = case.make(torch.float32)
    j = case.n_keys // 2 if key == "early" else case.n_keys - 1
    with torch.no_grad():
        k[0, 0, j, 5] = float("nan")
    spy = Spy(monkeypatch)
    with torch.no_grad():
        out, lse = triton_op(q, k, v, pk, pv, return_lse=True)
        out64, lse64 = prefix_attention_reference(*(t.double() for t in (q, k, v, pk, pv)))
    assert spy.calls == 1 and spy.splits[-1] > 1
    nan_rows = torch.zeros(case.batch, case.heads, case.n_queries, dtype=torch.bool, device=DEVICE)
    nan_rows[0, :2, :] = key == "early"
    nan_rows[0, :2, -1] = True
    assert torch.equal(torch.isnan(lse64), nan_rows)  # the premise
    assert torch.equal(torch.isnan(lse), nan_rows)
    assert torch.isnan(out[nan_rows]).all() and torch.isfinite(out[~nan_rows]).all()
    assert max_err(out[~nan_rows], out64[~nan_rows]) <= 1e-5
    assert max_err(lse[~nan_rows], lse64[~nan_rows]) <= 1e-5


GRAD_CASES = {
    "gqa2_bank_left_pad": Case(batch=2, heads=4, kv_heads=2, n_queries=1, n_keys=150, n_prefix=5, n_prefixes=2,
                               padding="left"),
    "mqa4_shared_prefix": Case(batch=2, heads=4, kv_heads=1, n_queries=1, n_keys=12, n_prefix=3),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_after_decode_forward(monkeypatch, name):
    """N = 1: the forward takes the decode path; the (general) backward's q, k, v and prefix
    gradients, recomputed from its out and log2 lse, match the fp64 reference."""
    spy = Spy(monkeypatch)
    check_against_reference(triton_op, _on_device(GRAD_CASES[name]), torch.float32)
    assert spy.calls == 1


@pytest.mark.parametrize("n_queries, heads, dtype, decode", [
    (1, 4, torch.float32, True),  # N * G = 4
    (4, 4, torch.float32, True),  # N = 4: the query threshold
    (5, 4, torch.float32, False),  # N = 5: prefill-like, the general kernel
    (1, 64, torch.float32, True),  # N * G = 64: the row threshold
    (1, 68, torch.float32, False),  # N * G = 68
    (1, 4, torch.float64, False),  # fp64 keeps the general kernel
])
def test_dispatch(monkeypatch, n_queries, heads, dtype, decode):
    """Decode path for decode-like calls only: N <= configs.DECODE_MAX_QUERIES and N * G <= configs.DECODE_MAX_ROWS."""
    case = Case(batch=1, heads=heads, kv_heads=1, n_queries=n_queries, n_keys=10, n_prefix=2)
    spy = Spy(monkeypatch)
    q, k, v, pk, pv, _, _ = case.make(dtype)
    with torch.no_grad():
        triton_op(q, k, v, pk, pv)
    assert spy.calls == int(decode)


@pytest.mark.parametrize("n_queries", [1, 3])
def test_decode_equals_general_kernel(monkeypatch, n_queries):
    """The same small-N input through both forwards (the general one forced by ``override_configs(decode_kernel=False)``,
    which also keeps the general kernel's small-N paths tested): fp32 results agree closely."""
    case = _on_device(Case(batch=2, heads=4, kv_heads=2, n_queries=n_queries, n_keys=200, n_prefix=5,
                           n_prefixes=2, padding="left"))
    q, k, v, pk, pv, mask, ids = case.make(torch.float32)
    kwargs = dict(key_padding_mask=mask, prefix_ids=ids, return_lse=True)
    spy = Spy(monkeypatch)
    with torch.no_grad():
        out_d, lse_d = triton_op(q, k, v, pk, pv, **kwargs)
        with configs.override_configs(decode_kernel=False):
            out_g, lse_g = triton_op(q, k, v, pk, pv, **kwargs)
    assert spy.calls == 1 and spy.splits[-1] > 1
    assert max_err(out_d, out_g) <= 1e-5 and max_err(lse_d, lse_g) <= 1e-5


def test_num_splits():
    """Every key in exactly one non-empty split; splits are whole blocks, at least the minimum
    length, at most max_splits; more programs (rows x kv heads) mean fewer splits."""
    cfg = DecodeConfig(block_n=64, min_keys_per_split=256, max_splits=64)
    for n_keys in (0, 1, 255, 256, 257, 1000, 4160, 100_000):
        for programs in (1, 8, 64, 512, 4096):
            splits, per = decode_num_splits(n_keys, programs, 132, cfg)
            assert 1 <= splits <= cfg.max_splits and per % cfg.block_n == 0
            assert splits * per >= n_keys and (splits - 1) * per < max(n_keys, 1)
            if splits > 1:
                assert per >= cfg.min_keys_per_split
    assert decode_num_splits(100_000, 1, 132, cfg)[0] >= 60  # 64 before rounding splits up to whole blocks
    assert decode_num_splits(100_000, 4096, 132, cfg)[0] == 1
    # B=64, Hkv=8 on 132 SMs, 3 programs per SM: 3 splits fill 3.9 waves (2 splits: 2.6, 1: 1.3)
    assert decode_num_splits(4160, 512, 132, cfg)[0] == 3
    for n_keys, programs in ((4160, 512), (100_000, 64), (50_000, 1000)):  # whole waves within reach: >= 90% full
        splits, _ = decode_num_splits(n_keys, programs, 132, cfg)
        waves = programs * splits / (132 * cfg.resident_per_sm)
        assert waves / -(-waves // 1) >= 0.9
