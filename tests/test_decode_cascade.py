"""The Triton decode cascade (kernels/decode.py, kernel 3): one prefix shared by every row, its part
computed once per kv head for all rows' queries, merged with each row's own keys by the combine.

Forced on and off (``override_configs(shared_prefix_decode=...)``) against the fp64 reference, with
the launch counted so that a test of the cascade cannot silently run the per-row path: padding,
caches, N = 1..4, GQA/MQA, windows, softcapping, sinks, Dv != D, prefixes across several splits,
16-bit dtypes, gradients through it (forward output and lse feed the backward). And the cost model:
which shapes take it by default.

Banks (prefix_ids choosing one of T prefixes per row): the prefix part per (prefix, kv head) over the
rows that use it, found on the device -- the same features, a bank of one, prefixes that no row uses,
every row on one prefix, tiles that straddle rows, several tiles per prefix, narrow and strided id
tensors; no read of a tensor value on the host; the cost model's bank terms; and (outside the
interpreter) that the bank kernel compiles for sm_90 at issue 16's shape without spilling.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import prefix_kernels.ops as ops
from helpers import Case, check_against_reference, requires_triton
from prefix_kernels import inspection, prefix_attention
from prefix_kernels.kernels import configs
from test_host_overhead import value_reads_by_package

pytestmark = [requires_triton]


class Launches:
    """Counts launches of the cascade's prefix kernel."""

    def __init__(self, monkeypatch):
        self.count = 0
        kernel = ops.prefix_attention_shared_prefix_kernel
        outer = self

        class Counted:
            def __getitem__(self, grid):
                outer.count += 1
                return kernel[grid]

        monkeypatch.setattr(ops, "prefix_attention_shared_prefix_kernel", Counted())


def triton_op(*args, **kwargs):
    return prefix_attention(*args, backend="triton", **kwargs)


CASES = {
    "N1_gqa2_left_pad": (Case(batch=3, heads=4, kv_heads=2, n_queries=1, n_keys=20, n_prefix=40, padding="left"), {}),
    "N4_mqa4_cache": (Case(batch=2, heads=4, kv_heads=1, n_queries=4, n_keys=30, n_prefix=33), {}),
    "N2_mha_noncausal_right_pad": (Case(batch=3, heads=2, kv_heads=2, n_queries=2, n_keys=9, n_prefix=70,
                                        causal=False, padding="right"), {}),
    "N1_window_softcap_sinks": (Case(batch=3, heads=4, kv_heads=2, n_queries=1, n_keys=40, n_prefix=21, q_scale=4.0),
                                dict(sliding_window=8, softcap=3.0, sinks=True)),
    "N3_dv_differs": (Case(batch=2, heads=4, kv_heads=2, n_queries=3, n_keys=12, n_prefix=17, head_dim_v=24), {}),
    "N1_prefix_over_splits": (Case(batch=4, heads=2, kv_heads=1, n_queries=1, n_keys=5, n_prefix=300), {}),
}


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_cascade_matches_reference(monkeypatch, name, on):
    case, features = CASES[name]
    launches = Launches(monkeypatch)
    with configs.override_configs(shared_prefix_decode=on):
        check_against_reference(triton_op, case, torch.float32, **features)
    assert (launches.count > 0) == on


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cascade_16bit(monkeypatch, dtype):
    case, features = CASES["N1_window_softcap_sinks"]
    launches = Launches(monkeypatch)
    with configs.override_configs(shared_prefix_decode=True):
        check_against_reference(triton_op, case, dtype, **features)
    assert launches.count > 0




def test_cost_model_takes_the_cascade_where_the_prefix_dominates():
    """64 rows sharing a 4096-token prefix over 64-token caches (issue 16's shape): cascade; one row, a
    short prefix or a long per-row cache: per row."""
    common = dict(head_dim=128, head_dim_v=128, itemsize=2, prefix_splits=8, block_rows=64)
    assert configs.use_shared_prefix_decode(64, 4, 4096, 64, **common)
    assert not configs.use_shared_prefix_decode(1, 4, 4096, 64, **common)
    assert not configs.use_shared_prefix_decode(64, 4, 16, 4096, **common)


# ---------------------------------------------------------------- banks: prefix_ids

class WithIds:
    """A Case whose prefix_ids are the given ones (for check_against_reference)."""

    def __init__(self, case: Case, ids, dtype=torch.int64, strided=False):
        self.case, self.ids, self.dtype, self.strided = case, list(ids), dtype, strided
        assert len(self.ids) == case.batch

    def __getattr__(self, name):
        return getattr(self.case, name)

    def make(self, *args, **kwargs):
        inputs = self.case.make(*args, **kwargs)
        ids = torch.tensor(self.ids, dtype=self.dtype, device=inputs.q.device)
        if self.strided:
            ids = torch.stack([ids, torch.zeros_like(ids)], 1).flatten()[::2]
        return dataclasses.replace(inputs, prefix_ids=ids)


def bank(**sizes) -> Case:
    return Case(**{**dict(batch=5, heads=4, kv_heads=2, n_queries=1, n_keys=12, n_prefix=40, n_prefixes=3), **sizes})


# Interpreted tiles are 16 stacked rows (configs.shared_prefix_block_rows): several of these cases need
# more than one tile per prefix, or put one batch row's (head, query) pairs in two tiles.
BANK_CASES = {
    "N1_gqa2_left_pad": (WithIds(bank(padding="left"), [2, 0, 2, 1, 0]), {}),
    "N3_mqa4_cache_tiles_straddle": (WithIds(bank(batch=4, kv_heads=1, n_queries=3, n_keys=30, n_prefix=33,
                                                  n_prefixes=2), [1, 1, 0, 1]), {}),  # 12 rows per batch row
    "N2_mha_noncausal_dead_rows": (WithIds(bank(heads=2, n_queries=2, n_keys=9, n_prefix=70, causal=False,
                                                padding="dead_rows"), [0, 1, 0, 1, 1]), {}),
    "N1_window_softcap_sinks": (WithIds(bank(n_keys=40, n_prefix=21, q_scale=4.0), [1, 2, 1, 0, 2]),
                                dict(sliding_window=8, softcap=3.0, sinks=True)),
    "N4_dv_differs": (WithIds(bank(batch=3, n_queries=4, head_dim_v=24), [2, 2, 0]), {}),
    "N1_prefix_over_splits": (WithIds(bank(batch=4, heads=2, kv_heads=1, n_keys=5, n_prefix=300), [0, 1, 1, 0]), {}),
    "unused_prefixes": (WithIds(bank(n_prefixes=5), [3, 1, 3, 3, 1]), {}),
    "every_row_on_one_prefix": (WithIds(bank(batch=6, kv_heads=1, n_queries=2), [2] * 6), {}),  # 3 tiles of t=2
    "bank_of_one": (WithIds(bank(n_prefixes=1), [0] * 5), {}),
    "int8_strided_ids": (WithIds(bank(), [1, 0, 2, 2, 1], dtype=torch.int8, strided=True), {}),
    "int32_ids_one_row": (WithIds(bank(batch=1, n_prefixes=4), [3], dtype=torch.int32), {}),
    # 70 rows: the kernel scans prefix_ids in two blocks of 64 (the running count carries over)
    "B70_ids_scanned_in_two_blocks": (WithIds(bank(batch=70, heads=1, kv_heads=1, n_keys=3, n_prefix=20),
                                              [(i * i) % 3 for i in range(70)]), {}),
}


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("name", list(BANK_CASES))
def test_bank_cascade_matches_reference(monkeypatch, name, on):
    case, features = BANK_CASES[name]
    launches = Launches(monkeypatch)
    with configs.override_configs(shared_prefix_decode=on):
        check_against_reference(triton_op, case, torch.float32, **features)
    assert (launches.count > 0) == on


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bank_cascade_16bit(monkeypatch, dtype):
    case, features = BANK_CASES["N1_window_softcap_sinks"]
    launches = Launches(monkeypatch)
    with configs.override_configs(shared_prefix_decode=True):
        check_against_reference(triton_op, case, dtype, **features)
    assert launches.count > 0


def test_bank_cascade_is_the_per_row_result_and_reads_no_tensor_value(monkeypatch):
    """Forced on and off give the same output (up to fp32 summation order), and with the ids checked
    by the caller the cascade's launch path reads no tensor value (a host sync on CUDA)."""
    case = WithIds(bank(batch=6, n_queries=2, n_prefixes=4), [3, 0, 3, 3, 0, 1])
    q, k, v, pk, pv, _, ids = case.make(torch.float32, requires_grad=False)
    launches = Launches(monkeypatch)
    with configs.override_configs(shared_prefix_decode=False):
        want, want_lse = triton_op(q, k, v, pk, pv, prefix_ids=ids, return_lse=True)
    with configs.override_configs(shared_prefix_decode=True), value_reads_by_package() as reads:
        got, got_lse = triton_op(q, k, v, pk, pv, prefix_ids=ids, prefix_ids_checked=True, return_lse=True)
    assert reads == [] and launches.count == 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=1e-5)


def test_cost_model_for_banks():
    """Issue 16's shape with a bank: few prefixes take the cascade, T close to B (little sharing) does
    not, nor a shape whose rows already fill a tile each; a bank of one is one shared prefix; the
    worst-case tile count; forcing stays within CUDA's grid limit and needs a prefix."""
    common = dict(head_dim=128, head_dim_v=128, itemsize=2, prefix_splits=8, block_rows=64)

    def cascade(t, batch=64, rows=4, n_prefix=4096, n_keys=64):
        return configs.use_shared_prefix_decode(batch, rows, n_prefix, n_keys, n_prefixes=t, **common)

    assert cascade(1) == configs.use_shared_prefix_decode(64, 4, 4096, 64, **common) is True
    assert all(cascade(t) for t in (2, 4, 16, 43))  # configs' comment: up to T = 43 here
    assert not any(cascade(t) for t in (44, 63, 64, 200))
    assert cascade(19, n_prefix=512, n_keys=512) and not cascade(20, n_prefix=512, n_keys=512)
    assert not any(cascade(t, rows=64) for t in (1, 2, 4))  # G * N = 64: each row fills a tile already
    assert not cascade(4, n_prefix=16, n_keys=4096)  # the per-row caches dominate
    assert not cascade(2, batch=1)

    assert configs.shared_prefix_tiles(64, 4, 64) == (4, 4)
    assert configs.shared_prefix_tiles(64, 4, 64, 4) == (4, 7)  # ceil(256 / 64) + min(T, B) - 1
    assert configs.shared_prefix_tiles(3, 4, 64, 8) == (1, 3)  # at most one tile per row here: min(T, B)
    assert configs.shared_prefix_tiles(2, 4, 64, 1000) == (1, 2)

    with configs.override_configs(shared_prefix_decode=True):
        assert cascade(64) and cascade(1, batch=1)
        assert not cascade(4, n_prefix=0)
        assert not cascade(70_000, batch=1)  # 70000 (prefix, tile) pairs: past grid axis 2
    with configs.override_configs(shared_prefix_decode=False):
        assert not cascade(4)


@pytest.fixture(scope="module")
def bank_report():
    return inspection.inspect_in_subprocess(
        [dict(shape="64x32x8x1x64x4096x128", dtype="bfloat16", arch="sm_90", prefix_bank=4)], timeout=600)[0]


def test_bank_cascade_compiles_for_sm90_without_spilling(bank_report):
    """Issue 16's shape, B=64, Hq=32, Hkv=8, N=1, M=64, P=4096, D=128, bf16, with a bank of T=4: the
    cascade runs (grid: 8 kv heads x prefix splits x 4 prefixes * 4 tiles), no spill, wgmma, 2
    programs per SM; no ATen launch (no sort, no bincount: the rows are found in the kernel)."""
    assert "error" not in bank_report, bank_report
    kernels = {k["name"]: k for k in bank_report["kernels"]}
    k = kernels["prefix_attention_shared_prefix_kernel"]
    assert k["grid"][0] == 8 and k["grid"][2] == 16, k
    assert k["spill_bytes"] == 0 and k["spill_load_bytes"] == 0 and k["wgmma"] > 0, k
    assert k["blocks_per_sm"] >= configs.SHARED_PREFIX_RESIDENT_PER_SM, k
    assert all(x["spill_bytes"] == 0 for x in bank_report["kernels"]), bank_report["kernels"]
    assert bank_report["aten_launches"]["forward"] == [], bank_report["aten_launches"]
