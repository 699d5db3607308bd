"""The C++ CPU op's shared-prefix decode (the cascade) against the fp64 reference.

For decode-like calls whose rows share prefixes, the op computes the prefix part once per (prefix,
kv head, chunk of rows) as one product of all those rows' queries, then each row's own keys, merged
through the softmax state (csrc/prefix_attention.cpp, ``plan_cascade``). These tests force it on
(``CPUOptions(cascade=True)``), off (``False``) or leave it to the cost model (None), check that it
was taken (``cpu.cascade_calls``), and compare out, lse and every gradient (the backward consumes the
cascade's out and lse) with ``helpers.check_against_reference``.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from prefix_kernels import cpu
from prefix_kernels.reference import prefix_attention_reference
from helpers import ATOL, Case, check_against_reference, max_err, need

# decode against a cache: 6 rows, GQA 8:2, 2 queries of a 9-token cache, one shared prefix of 40
BASE = Case(batch=6, heads=8, kv_heads=2, n_queries=2, n_keys=9, n_prefix=40, head_dim=16)


@pytest.fixture(scope="module", autouse=True)
def ext():
    need("cpu")


def cpu_op(q, k, v, prefix_k, prefix_v, *, scale=None, return_lse=True, **kwargs):
    """(out, lse) of ``cpu.prefix_attention_cpu`` with prefix_attention's signature."""
    assert return_lse, "the C++ op always returns (out, lse)"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return cpu.prefix_attention_cpu(q, k, v, prefix_k, prefix_v, scale=scale, **kwargs)


@contextmanager
def cascade_taken(cascade: bool | None, taken: bool):
    """Asserts that the body's calls (with ``CPUOptions(cascade=cascade)``) took the cascade or not."""
    before = cpu.cascade_calls()
    yield
    assert (cpu.cascade_calls() > before) == taken, f"cascade={cascade}: taken {not taken}, expected {taken}"


def check(case: Case, dtype=torch.float32, cascade=True, taken=True, options=None, **features):
    """check_against_reference of the op with ``CPUOptions(cascade=cascade, **(options or {}))``."""
    fn = functools.partial(cpu_op, options=cpu.CPUOptions(cascade=cascade, **(options or {})))
    with cascade_taken(cascade, taken):
        return check_against_reference(fn, case, dtype, device="cpu", **features)


def check_ids(case: Case, ids: torch.Tensor, cascade: bool | None, taken: bool, tol=2e-5):
    """A bank with prefix_ids chosen here (check_against_reference draws its own): out, lse and
    the five gradients against the fp64 reference."""
    inputs = case.make(torch.float32, "cpu")
    leaves = list(inputs.tensors)
    kwargs = dict(causal=case.causal, key_padding_mask=inputs.key_padding_mask, prefix_ids=ids)
    with cascade_taken(cascade, taken):
        out, lse = cpu_op(*leaves, **kwargs, options=cpu.CPUOptions(cascade=cascade))
        grads = torch.autograd.grad(out, leaves, inputs.grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out64, lse64 = prefix_attention_reference(*leaves64, **kwargs)
    grads64 = torch.autograd.grad(out64, leaves64, inputs.grad_out.double())
    assert max_err(out, out64) <= tol and max_err(lse, lse64) <= tol
    for name, g, g64 in zip(("q", "k", "v", "prefix_k", "prefix_v"), grads, grads64):
        assert max_err(g, g64) <= tol * max(1.0, g64.abs().max().item()), name


# ---------------------------------------------------------------- the dispatch edges

@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_shared_prefix_decode(n):
    """T = 1 (one prefix for every row), N = 1..4 queries at the end of an M-token cache: forced on,
    and the cost model takes it too (P = 40 against 9 cached keys, 6 rows sharing)."""
    case = replace(BASE, n_queries=n)
    check(case)
    check(case, cascade=None, taken=True)


def test_no_prefix():
    """P = 0: there is no prefix part, so not even PREFIX_KERNELS_CPU_CASCADE=1 takes the cascade."""
    check(replace(BASE, n_prefix=0, padding="left"), cascade=True, taken=False)


@pytest.mark.parametrize("padding", ["left", "left_any", "dead_rows"])
def test_padding(padding):
    """The prefix is never masked: rows with every cached key padded still see the whole prefix."""
    check(replace(BASE, padding=padding, n_keys=12))


def test_bank_with_few_prefixes():
    """A bank of 3 prefixes over 10 rows (ids drawn at random): rows grouped by prefix id."""
    case = replace(BASE, batch=10, n_prefixes=3, padding="left")
    check(case)
    check(case, cascade=None, taken=True)


def test_bank_with_one_row_per_prefix():
    """T = B, every row its own prefix: nothing is shared, the cost model keeps the per-row path;
    forced, the cascade is still exact (chunks of one row)."""
    case = replace(BASE, batch=5, n_prefixes=5, with_ids=False, padding="left")
    ids = torch.tensor([3, 0, 4, 1, 2])
    check_ids(case, ids, cascade=None, taken=False)
    check_ids(case, ids, cascade=True, taken=True)


def test_bank_with_unused_prefixes_and_strided_ids():
    """Ids that skip prefixes of the bank (no chunk for them), given as a stride-2 int32 view."""
    case = replace(BASE, batch=7, n_prefixes=6, with_ids=False)
    wide = torch.tensor([5, 9, 2, 9, 5, 9, 5, 9, 2, 9, 2, 9, 5, 9], dtype=torch.int32)
    check_ids(case, wide[::2], cascade=True, taken=True)


def test_many_chunks_per_prefix():
    """CPUOptions(cascade_rows=20) (two rows of G * N = 8 query rows per chunk): a prefix's rows
    span several chunks, the last one shorter."""
    check(replace(BASE, batch=9, n_prefixes=2, padding="right"), options=dict(cascade_rows=20))


def test_cost_model_keeps_the_per_row_path():
    """Not decode-like (N = 5 > 4), or a short prefix against a long cache (P = 4 vs M = 200): the
    cost model says no; forced on, both are still exact."""
    for case in (replace(BASE, n_queries=5), replace(BASE, n_prefix=4, n_keys=200)):
        check(case, cascade=None, taken=False)
        check(case, cascade=True, taken=True)


def test_off_is_the_per_row_path():
    check(BASE, cascade=False, taken=False)


def test_bad_mode_names_the_variable():
    with pytest.raises(ValueError, match="PREFIX_KERNELS_CPU_CASCADE must be 0, 1 or auto, got 'yes'"):
        cpu.CPUOptions.from_env({"PREFIX_KERNELS_CPU_CASCADE": "yes"})
    assert cpu.CPUOptions.from_env({"PREFIX_KERNELS_CPU_CASCADE": "auto"}).cascade is None
    assert cpu.CPUOptions.from_env({"PREFIX_KERNELS_CPU_CASCADE": "0"}).cascade is False


# ---------------------------------------------------------------- the features, with the cascade on

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_sliding_window(causal):
    """The window cuts the row's own keys, never the prefix (non-causal: early queries see keys
    after them too)."""
    check(replace(BASE, n_keys=30, causal=causal, padding="left"), sliding_window=4)


def test_softcap():
    check(replace(BASE, q_scale=4.0, n_prefixes=2), softcap=2.0)


def test_sinks():
    """The sink joins the merged denominator once (prefix part + own keys + sink)."""
    check(replace(BASE, padding="dead_rows"), sinks=True)


@pytest.mark.parametrize("d, dv", [(16, 24), (24, 8)], ids=lambda x: str(x))
def test_value_head_dim(d, dv):
    check(replace(BASE, head_dim=d, head_dim_v=dv, n_prefixes=2, strided=True))


def test_everything_at_once():
    check(replace(BASE, batch=8, n_keys=20, n_prefixes=3, padding="left_any", head_dim_v=12,
                  q_scale=3.0, strided=True), sliding_window=6, softcap=5.0, sinks=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_dtypes(dtype):
    check(replace(BASE, n_prefixes=2, padding="left"), dtype)


def test_long_prefix_many_tiles():
    """A prefix over several cascade tiles (256 keys each) with a ragged last tile, GQA 4:1."""
    check(Case(batch=4, heads=4, kv_heads=1, n_queries=1, n_keys=7, n_prefix=600, head_dim=32,
               padding="left"), cascade=None, taken=True)


# ---------------------------------------------------------------- agreement and determinism

def test_cascade_matches_the_per_row_path():
    """Same problem, cascade on and off: the same out and lse to fp32 rounding."""
    inputs = replace(BASE, batch=8, n_prefix=300, n_prefixes=2, padding="left").make(
        torch.float32, "cpu", requires_grad=False)
    results = []
    for on in (True, False):
        with cascade_taken(on, on):
            results.append(cpu_op(*inputs.tensors, causal=True, key_padding_mask=inputs.key_padding_mask,
                                  prefix_ids=inputs.prefix_ids, options=cpu.CPUOptions(cascade=on)))
    (out1, lse1), (out0, lse0) = results
    assert max_err(out1, out0) <= ATOL[torch.float32] and max_err(lse1, lse0) <= 1e-5


def test_bit_identical_across_thread_counts():
    """The cascade's chunks come from the shape and prefix_ids, never the thread count."""
    inputs = replace(BASE, batch=9, n_prefix=300, n_prefixes=2, padding="left").make(torch.float32, "cpu")
    leaves = list(inputs.tensors)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with cascade_taken(True, True):
                out, lse = cpu_op(*leaves, causal=True, key_padding_mask=inputs.key_padding_mask,
                                  prefix_ids=inputs.prefix_ids, options=cpu.CPUOptions(cascade=True))
            results.append((out, lse, *torch.autograd.grad(out, leaves, inputs.grad_out)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the benchmark's providers

def test_benchmark_providers_pass_the_gate():
    """bench_cpu.py --preset shared-prefix-cpu times ours against ours_prefix_in_cache (the prefix
    copied into every row's cache, the copy cached per input tensors) and ours_no_cascade: both
    compute the same attention (decode, and a training shape: the copy is bottom-right causal too)."""
    from prefix_kernels.benchmarking import Shape
    from prefix_kernels.benchmarking.correctness import check_provider
    from prefix_kernels.benchmarking.providers import EXTRA_PROVIDERS, resolve_providers

    assert [p.name for p in resolve_providers("ours,ours_prefix_in_cache,ours_no_cascade")] == [
        "ours", "ours_prefix_in_cache", "ours_no_cascade"]
    for text in ("4x8x2x1x16x64x32", "2x4x2x24x24x8x16"):
        for provider in EXTRA_PROVIDERS.values():
            assert check_provider(provider, Shape.parse(text), torch.float32, "cpu") < 1e-4, (text, provider.name)


def test_no_cascade_provider_passes_the_option():
    """ours_no_cascade turns the cascade off through the op's option, on a decode shape where ours
    takes it, and leaves the environment as it was."""
    from prefix_kernels.benchmarking.providers import ours, ours_no_cascade

    inputs = replace(BASE, batch=8, n_queries=1, n_prefix=300).make(
        torch.float32, "cpu", requires_grad=False)
    q, k, v, pk, pv = inputs.tensors
    environ = dict(os.environ)
    with cascade_taken(None, True):
        want = ours(q, k, v, pk, pv)
    with cascade_taken(False, False):
        got = ours_no_cascade(q, k, v, pk, pv)
    assert dict(os.environ) == environ
    assert max_err(got, want) <= ATOL[torch.float32]
