"""The Triton decode cascade (kernels/decode.py, kernel 3): one prefix shared by every row, its part
computed once per kv head for all rows' queries, merged with each row's own keys by the combine.

Forced on and off (``override_configs(shared_prefix_decode=...)``) against the fp64 reference, with
the launch counted so that a test of the cascade cannot silently run the per-row path: padding,
caches, N = 1..4, GQA/MQA, windows, softcapping, sinks, Dv != D, prefixes across several splits,
16-bit dtypes, gradients through it (forward output and lse feed the backward). And the cost model:
which shapes take it by default.
"""

from __future__ import annotations

import pytest
import torch

import prefix_kernels.ops as ops
from helpers import Case, check_against_reference, requires_triton
from prefix_kernels import prefix_attention
from prefix_kernels.kernels import configs

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


def test_a_bank_keeps_the_per_row_path(monkeypatch):
    case = Case(batch=3, heads=4, kv_heads=2, n_queries=1, n_keys=10, n_prefix=40, n_prefixes=2)
    launches = Launches(monkeypatch)
    with configs.override_configs(shared_prefix_decode=True):
        check_against_reference(triton_op, case, torch.float32)
    assert launches.count == 0


def test_cost_model_takes_the_cascade_where_the_prefix_dominates():
    """64 rows sharing a 4096-token prefix over 64-token caches (issue 16's shape): cascade; one row, a
    short prefix or a long per-row cache: per row; a bank: never."""
    common = dict(head_dim=128, head_dim_v=128, itemsize=2, prefix_splits=8, block_rows=64)
    assert configs.use_shared_prefix_decode(64, 4, 4096, 64, has_prefix_ids=False, **common)
    assert not configs.use_shared_prefix_decode(1, 4, 4096, 64, has_prefix_ids=False, **common)
    assert not configs.use_shared_prefix_decode(64, 4, 16, 4096, has_prefix_ids=False, **common)
    assert not configs.use_shared_prefix_decode(64, 4, 4096, 64, has_prefix_ids=True, **common)
