"""The C++ CPU op (csrc/, prefix_kernels/cpu.py) against the reference.

Most tests go through ``prefix_attention(..., backend="cpu")`` so the public validation runs too.
They need the extension, built on first use (about 20 s on 2 cores); without a compiler they
skip with the build error as the reason. The fallback tests (extension disabled) always run.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from prefix_kernels import cpu, prefix_attention, prefix_attention_reference
from helpers import Case, check_against_reference, need

ROOT = Path(__file__).resolve().parents[1]
cpu_attention = functools.partial(prefix_attention, backend="cpu")


@pytest.fixture(scope="module")
def ext():
    need("cpu")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    """Runs python code in a fresh interpreter at the repo root (the build cache is shared)."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- against the reference

CASES = {
    "base": Case(),
    "decode N=1": Case(n_queries=1, n_keys=40),
    "N=113 M>N (cache) P=37": Case(n_queries=113, n_keys=150, n_prefix=37),
    "P=0": Case(n_prefix=0, padding="right"),
    "P=1": Case(n_prefix=1),
    "GQA 4:1": Case(heads=8, kv_heads=2, n_queries=33, n_keys=40),
    "MQA": Case(heads=4, kv_heads=1, n_queries=20, n_keys=20, padding="left"),
    "left padding": Case(padding="left", n_queries=24, n_keys=24),
    "right padding": Case(padding="right", n_queries=24, n_keys=30),
    "prefix_ids T=3": Case(batch=4, n_prefixes=3, heads=4, kv_heads=2),
    "non-contiguous": Case(strided=True, heads=4, kv_heads=2, padding="left"),
    "non-causal": Case(causal=False, n_queries=12, n_keys=31, n_prefixes=3, batch=3),
    "head dim 40": Case(head_dim=40, n_queries=9, n_keys=9),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(ext, name, dtype):
    check_against_reference(cpu_attention, CASES[name], dtype)


# Shapes that cross the kernel's block boundaries: several query blocks and key tiles (prefix
# longer than a tile too), the few-rows decode path with long tiles, GQA, padding and a bank.
LARGE = {
    "blocks": Case(batch=2, heads=6, kv_heads=2, n_queries=300, n_keys=333, n_prefix=150, head_dim=64,
                   padding="left", n_prefixes=2, strided=True),
    "decode long": Case(batch=3, heads=8, kv_heads=2, n_queries=1, n_keys=1100, n_prefix=530,
                        head_dim=64, padding="right"),
    "few queries": Case(batch=2, heads=4, kv_heads=4, n_queries=3, n_keys=700, n_prefix=5, head_dim=24),
}


@pytest.mark.parametrize("name", list(LARGE))
def test_matches_reference_large(ext, name):
    check_against_reference(cpu_attention, LARGE[name], torch.float32)


def test_float64_matches_reference(ext):
    check_against_reference(cpu_attention, Case(heads=4, kv_heads=2, padding="left", n_prefixes=2, batch=3),
                            torch.float64)


def cpu_op(q, k, v, prefix_k, prefix_v, *, scale=None, return_lse=True, **kwargs):
    """(out, lse) of ``cpu.prefix_attention_cpu`` (which takes ``options``), called as
    check_against_reference calls prefix_attention."""
    assert return_lse, "the C++ op always returns (out, lse)"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return cpu.prefix_attention_cpu(q, k, v, prefix_k, prefix_v, scale=scale, **kwargs)


def test_portable_kernels_match(ext):
    """The non-AVX2 build of the kernels (CPUOptions(isa="base"), picked per call)."""
    options = cpu.CPUOptions(isa="base")
    assert "isa=base" in cpu.build_info(options)
    fn = functools.partial(cpu_op, options=options)
    for case in (CASES["GQA 4:1"], CASES["non-contiguous"], LARGE["decode long"]):
        check_against_reference(fn, case, torch.float32)
    check_against_reference(fn, CASES["prefix_ids T=3"], torch.bfloat16)
    check_against_reference(fn, CASES["MQA"], torch.float16)


def test_aten_gemm_path_matches(ext):
    """With CPUOptions(gemm="aten") tile products go through ATen (picked per call)."""
    options = cpu.CPUOptions(gemm="aten")
    assert "gemm=aten" in cpu.build_info(options), cpu.build_info(options)
    fn = functools.partial(cpu_op, options=options)
    check_against_reference(fn, Case(heads=4, kv_heads=2, padding="left", n_prefixes=2, batch=3), torch.float32)
    check_against_reference(fn, Case(heads=4, kv_heads=2, strided=True), torch.float64)


# ---------------------------------------------------------------- options and the environment

def test_environment_is_read_once_at_import(ext):
    """The PREFIX_KERNELS_CPU_* variables become cpu.ENV_OPTIONS when cpu.py is imported, the
    options of every call that passes none; changing the environment later changes nothing."""
    result = _run(
        """
        import os, torch
        from prefix_kernels import cpu, prefix_attention
        from helpers import Case
        want = cpu.CPUOptions(isa="base", gemm="aten", cascade=True, block_rows=32, block_k=16,
                              cascade_rows=8, cascade_block_k=64)
        assert cpu.ENV_OPTIONS == want, cpu.ENV_OPTIONS
        assert cpu.is_available(), cpu.unavailable_reason()
        assert "isa=base gemm=aten" in cpu.build_info(), cpu.build_info()
        q, k, v, pk, pv, _, _ = Case(batch=4, n_queries=20, n_keys=20).make(torch.float32, "cpu")
        ref = prefix_attention(q, k, v, pk, pv, backend="reference")
        for cascade in ("1", "0"):  # the environment changed after the import: not read again
            os.environ["PREFIX_KERNELS_CPU_CASCADE"] = cascade
            before = cpu.cascade_calls()
            out = prefix_attention(q, k, v, pk, pv, backend="cpu")
            assert cpu.cascade_calls() == before + 1  # N = 20: only a forced cascade takes it
            assert (out - ref).abs().max() < 1e-5
        print("ok")
        """,
        PREFIX_KERNELS_CPU_ISA="base", PREFIX_KERNELS_CPU_GEMM="aten", PREFIX_KERNELS_CPU_CASCADE="1",
        PREFIX_KERNELS_CPU_ROWS="32", PREFIX_KERNELS_CPU_BLOCK_K="16", PREFIX_KERNELS_CPU_CASCADE_ROWS="8",
        PREFIX_KERNELS_CPU_CASCADE_BLOCK_K="64",
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("variable, value, expected", [
    ("PREFIX_KERNELS_CPU_ISA", "avx512", "auto or base"),
    ("PREFIX_KERNELS_CPU_GEMM", "mkl", "auto or aten"),
    ("PREFIX_KERNELS_CPU_CASCADE", "on", "0, 1 or auto"),
    ("PREFIX_KERNELS_CPU_ROWS", "0", "a positive integer"),
    ("PREFIX_KERNELS_CPU_BLOCK_K", "big", "a positive integer"),
])
def test_bad_environment_names_the_variable(variable, value, expected):
    with pytest.raises(ValueError, match=f"{variable} must be {expected}, got '{value}'"):
        cpu.CPUOptions.from_env({variable: value})


def test_empty_environment_is_the_defaults():
    assert cpu.CPUOptions.from_env({}) == cpu.CPUOptions()
    assert cpu.CPUOptions.from_env({"PREFIX_KERNELS_CPU_ROWS": ""}) == cpu.CPUOptions()
    assert cpu.CPUOptions().op_arg() == ()  # the schema's default
    assert cpu.CPUOptions(cascade=False, block_k=64).op_arg() == (0, 0, 0, 0, 64, 0, 0)
    assert cpu.CPUOptions(isa="base", gemm="aten", cascade_rows=8).op_arg() == (1, 1, -1, 0, 0, 8, 0)


@pytest.mark.parametrize("field, value, message", [
    ("isa", "avx2", "CPUOptions.isa must be one of 'auto', 'base', got 'avx2'"),
    ("gemm", None, "CPUOptions.gemm must be one of 'auto', 'aten', got None"),
    ("cascade", "1", "CPUOptions.cascade must be None, False or True, got '1'"),
    ("block_k", 0, "CPUOptions.block_k must be an int >= 1 or None, got 0"),
    ("cascade_rows", 2.5, "CPUOptions.cascade_rows must be an int >= 1 or None, got 2.5"),
])
def test_bad_options_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cpu.CPUOptions(**{field: value})


def test_op_checks_its_options(ext):
    """The op's own checks, for callers of torch.ops.prefix_kernels.fwd_cpu / bwd_cpu."""
    q, k, v, pk, pv, _, _ = Case().make(torch.float32, "cpu", requires_grad=False)
    op = torch.ops.prefix_kernels.fwd_cpu
    with pytest.raises(RuntimeError, match=r"options\[0\] is isa \(0 or 1\), got 2"):
        op(q, k, v, pk, pv, None, None, True, 0.3, options=[2, 0, -1, 0, 0, 0, 0])
    with pytest.raises(RuntimeError, match=r"options\[2\] is cascade \(-1, 0 or 1\), got 3"):
        op(q, k, v, pk, pv, None, None, True, 0.3, options=[0, 0, 3, 0, 0, 0, 0])
    with pytest.raises(RuntimeError, match=r"options\[4\] is block_k \(>= 0\), got -2"):
        op(q, k, v, pk, pv, None, None, True, 0.3, options=[0, 0, -1, 0, -2, 0, 0])
    with pytest.raises(RuntimeError, match=r"options must hold 7 ints \(isa, gemm, cascade, .*\) or none, got 2"):
        op(q, k, v, pk, pv, None, None, True, 0.3, options=[1, 1])


def test_tile_options_match_reference(ext):
    """Tiny blocks (block_rows=4: one query per task for G=4; block_k=3: ragged key tiles) are the
    same attention."""
    fn = functools.partial(cpu_op, options=cpu.CPUOptions(block_rows=4, block_k=3))
    check_against_reference(fn, CASES["N=113 M>N (cache) P=37"], torch.float32)
    check_against_reference(fn, CASES["GQA 4:1"], torch.float32)


# ---------------------------------------------------------------- edge cases

def test_rows_that_see_nothing(ext):
    """P = 0 and every visible key padded: out = 0, lse = -inf, zero grads, no NaN anywhere."""
    case = Case(batch=3, heads=2, kv_heads=2, n_queries=6, n_keys=9, n_prefix=0, head_dim=16)
    inputs = case.make(torch.float32, "cpu")
    q, k, v, pk, pv = inputs.tensors
    B, H, N, M = case.B, case.Hq, case.N, case.M
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[0] = False          # row 0: nothing at all
    mask[1, :6] = False      # row 1, left padding: queries 0..2 (positions 3..5) see nothing
    out, lse = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, return_lse=True, backend="cpu")
    ref_out, ref_lse = prefix_attention_reference(q, k, v, pk, pv, key_padding_mask=mask)
    dead = torch.zeros(B, H, N, dtype=torch.bool)
    dead[0] = True
    dead[1, :, :3] = True
    assert torch.equal(torch.isinf(lse), dead) and (lse[dead] < 0).all()
    assert torch.equal(torch.isinf(ref_lse), dead)
    assert (out[dead] == 0).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    grad = inputs.grad_out
    dq, dk, dv, dpk, dpv = torch.autograd.grad(out, (q, k, v, pk, pv), grad)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert (dq[0] == 0).all() and (dq[1, :, :3] == 0).all()
    assert (dk[0] == 0).all() and (dv[0] == 0).all()
    assert dpk.shape == pk.shape and dpv.shape == pv.shape
    want = torch.autograd.grad(ref_out, (q, k, v), grad)
    for g, w in zip((dq, dk, dv), want):
        torch.testing.assert_close(g, w, atol=5e-5, rtol=1e-4)


def test_prefix_only_rows(ext):
    """All sequence keys padded but a prefix present: the prefix alone carries the softmax."""
    q, k, v, pk, pv, _, _ = Case(n_prefix=3).make(torch.float32, "cpu")
    mask = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool)
    out, lse = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, return_lse=True, backend="cpu")
    ref_out, ref_lse = prefix_attention_reference(q, k, v, pk, pv, key_padding_mask=mask)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)


def test_empty_sizes(ext):
    """Zero-size batch, queries or keys do not crash and give the reference's shapes."""
    for B, N, M, P, causal in ((0, 4, 4, 2, True), (2, 0, 5, 2, True), (2, 3, 0, 2, False), (2, 3, 0, 0, False)):
        case = Case(batch=B, heads=2, kv_heads=1, n_queries=N, n_keys=M, n_prefix=P, head_dim=8, causal=causal)
        q, k, v, pk, pv = case.make(torch.float32, "cpu").tensors
        out, lse = prefix_attention(q, k, v, pk, pv, causal=causal, return_lse=True, backend="cpu")
        assert out.shape == q.shape and lse.shape == q.shape[:3]
        if P + M == 0:  # no key at all (the reference cannot reduce over zero keys)
            assert (out == 0).all() and (lse == float("-inf")).all()
        else:
            ref_out, ref_lse = prefix_attention_reference(q, k, v, pk, pv, causal=causal)
            torch.testing.assert_close(out, ref_out)
            torch.testing.assert_close(lse, ref_lse)
        grads = torch.autograd.grad(out.sum(), (q, k, v, pk, pv), allow_unused=True)
        for g, t in zip(grads, (q, k, v, pk, pv)):
            assert g is not None and g.shape == t.shape and torch.isfinite(g).all()
            if B == 0 or N == 0 or P + M == 0:
                assert (g == 0).all()


@pytest.mark.parametrize("frozen", ["prefix", "kv", "q", "all but prefix"])
def test_frozen_inputs(ext, frozen):
    """Gradients of frozen tensors are None; the others equal those of the full run bit for bit."""
    case = Case(heads=4, kv_heads=2, n_queries=20, n_keys=26, padding="left", n_prefixes=2, batch=3)
    q, k, v, pk, pv, mask, ids = case.make(torch.float32, "cpu")
    kwargs = dict(key_padding_mask=mask, prefix_ids=ids, backend="cpu")
    grad = torch.randn(q.shape)
    full = torch.autograd.grad(prefix_attention(q, k, v, pk, pv, **kwargs), (q, k, v, pk, pv), grad)
    names = ["q", "k", "v", "prefix_k", "prefix_v"]
    frozen_names = {"prefix": {"prefix_k", "prefix_v"}, "kv": {"k", "v"}, "q": {"q"},
                    "all but prefix": {"q", "k", "v"}}[frozen]
    leaves = [t.detach().requires_grad_(n not in frozen_names) for n, t in zip(names, (q, k, v, pk, pv))]
    out = prefix_attention(*leaves, **kwargs)
    out.backward(grad)
    for name, leaf, want in zip(names, leaves, full):
        if name in frozen_names:
            assert leaf.grad is None, name
        else:
            assert torch.equal(leaf.grad, want), name


def test_backward_op_skips_unneeded_grads(ext):
    """bwd_cpu returns empty tensors for gradients that were not asked for."""
    q, k, v, pk, pv, mask, ids = Case(n_prefixes=2).make(torch.float32, "cpu")
    q, k, v, pk, pv = (t.detach() for t in (q, k, v, pk, pv))
    out, lse = torch.ops.prefix_kernels.fwd_cpu(q, k, v, pk, pv, mask, ids, True, 0.25)
    grads = torch.ops.prefix_kernels.bwd_cpu(torch.ones_like(out), q, k, v, pk, pv, out, lse, mask, ids,
                                             True, 0.25, [False, False, False, True, False])
    assert [g.numel() > 0 for g in grads] == [False, False, False, True, False]
    assert grads[3].shape == pk.shape


def test_output_layout_follows_q(ext):
    """out keeps q's memory layout (HF's [B, N, H, D] storage stays free to reshape)."""
    q, k, v, pk, pv, _, _ = Case(strided=True).make(torch.float32, "cpu")
    out = prefix_attention(q, k, v, pk, pv, backend="cpu")
    assert out.stride() == q.stride()
    assert out.transpose(1, 2).is_contiguous()


def test_lse_is_detached_fp32(ext):
    q, k, v, pk, pv, _, _ = Case().make(torch.bfloat16, "cpu")
    out, lse = prefix_attention(q, k, v, pk, pv, return_lse=True, backend="cpu")
    assert out.requires_grad and not lse.requires_grad and lse.dtype == torch.float32


def test_op_checks_name_the_argument(ext):
    shapes = Case(batch=2, heads=4, kv_heads=2, n_queries=5, n_keys=7, n_prefix=3, head_dim=8)
    q, k, _, pk, _ = shapes.make(torch.float32, "cpu", requires_grad=False).tensors
    op = torch.ops.prefix_kernels.fwd_cpu
    with pytest.raises(RuntimeError, match=r"k must be \[B=2, Hkv, M, D=8\]"):
        op(q, torch.randn(3, 2, 7, 8), k, pk, pk, None, None, True, 0.3)
    with pytest.raises(RuntimeError, match=r"prefix_k must be \[Hkv=2, P, D=8\]"):
        op(q, k, k, torch.randn(3, 3, 8), torch.randn(3, 3, 8), None, None, True, 0.3)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must be a bool \[B=2, M=7\]"):
        op(q, k, k, pk, pk, torch.ones(2, 6, dtype=torch.bool), None, True, 0.3)
    with pytest.raises(RuntimeError, match=r"prefix_ids must be in \[0, T=2\)"):
        op(q, k, k, pk.expand(2, -1, -1, -1), pk.expand(2, -1, -1, -1), None, torch.tensor([0, 2]), True, 0.3)
    with pytest.raises(RuntimeError, match=r"causal attention needs k's M=4 >= q's N=5"):
        op(q, k[:, :, :4], k[:, :, :4], pk, pk, None, None, True, 0.3)


# ---------------------------------------------------------------- autograd and op checks

def test_gradcheck_float64(ext):
    case = Case(batch=2, heads=4, kv_heads=2, n_queries=5, n_keys=7, n_prefix=3, head_dim=8,
                padding="left", n_prefixes=2, strided=True)
    q, k, v, pk, pv, mask, ids = case.make(torch.float64, "cpu")

    def fn(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, prefix_ids=ids, backend="cpu")

    assert torch.autograd.gradcheck(fn, (q, k, v, pk, pv), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_float64_non_causal_shared_prefix(ext):
    case = Case(batch=2, heads=3, kv_heads=1, n_queries=4, n_keys=6, n_prefix=2, head_dim=8, causal=False)
    q, k, v, pk, pv, _, _ = case.make(torch.float64, "cpu")

    def fn(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, causal=False, scale=0.4, backend="cpu")

    assert torch.autograd.gradcheck(fn, (q, k, v, pk, pv), eps=1e-6, atol=1e-7, rtol=1e-5)


def _op_args(requires_grad: bool, with_mask: bool):
    case = Case(batch=2, heads=4, kv_heads=2, n_queries=5, n_keys=7, n_prefix=3, head_dim=8,
                padding="left" if with_mask else None, n_prefixes=2 if with_mask else None)
    return tuple(case.make(torch.float32, "cpu", requires_grad=requires_grad))


@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck_fwd(ext, with_mask):
    q, k, v, pk, pv, mask, ids = _op_args(True, with_mask)
    torch.library.opcheck(torch.ops.prefix_kernels.fwd_cpu.default, (q, k, v, pk, pv, mask, ids, True, 0.35))


def test_opcheck_with_options(ext):
    """The options travel through the fakes and the registered autograd: a forced cascade on a
    shared-prefix decode, the portable kernels and ATen GEMMs in the backward."""
    q, k, v, pk, pv, mask, ids = Case(batch=4, heads=4, kv_heads=2, n_queries=1, n_keys=7, n_prefix=9,
                                      head_dim=8, padding="left").make(torch.float32, "cpu")
    options = cpu.CPUOptions(isa="base", gemm="aten", cascade=True, block_k=4, cascade_rows=2).op_arg()
    args = (q, k, v, pk, pv, mask, ids, True, 0.35, None, None, None, options)
    torch.library.opcheck(torch.ops.prefix_kernels.fwd_cpu.default, args)
    out, lse = torch.ops.prefix_kernels.fwd_cpu(*(t.detach() if isinstance(t, torch.Tensor) else t for t in args))
    bwd_args = (torch.randn_like(out), *(t.detach() for t in (q, k, v, pk, pv)), out, lse, mask, ids, True, 0.35,
                [True] * 5, None, None, None, options)
    torch.library.opcheck(torch.ops.prefix_kernels.bwd_cpu.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck_bwd(ext, with_mask):
    q, k, v, pk, pv, mask, ids = _op_args(False, with_mask)
    out, lse = torch.ops.prefix_kernels.fwd_cpu(q, k, v, pk, pv, mask, ids, True, 0.35)
    for output_mask in ([True] * 5, [False, True, False, True, False]):
        args = (torch.randn_like(out), q, k, v, pk, pv, out, lse, mask, ids, True, 0.35, output_mask)
        # No input requires grad (there is no double backward), so the autograd registration
        # test does not apply.
        torch.library.opcheck(torch.ops.prefix_kernels.bwd_cpu.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_registered_autograd_of_the_op(ext):
    """fwd_cpu is differentiable on its own (register_autograd), like through prefix_attention."""
    q, k, v, pk, pv, mask, ids = _op_args(True, True)
    out, _ = torch.ops.prefix_kernels.fwd_cpu(q, k, v, pk, pv, mask, ids, True, 0.35)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, pk, pv), grad)
    want = torch.autograd.grad(
        prefix_attention(q, k, v, pk, pv, scale=0.35, key_padding_mask=mask, prefix_ids=ids, backend="cpu"),
        (q, k, v, pk, pv), grad)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ---------------------------------------------------------------- determinism

def test_bit_identical_across_thread_counts(ext):
    case = Case(batch=5, heads=6, kv_heads=2, n_queries=150, n_keys=170, n_prefix=20, head_dim=32,
                padding="left", n_prefixes=3)
    q, k, v, pk, pv, mask, ids = case.make(torch.float32, "cpu")
    grad = torch.randn(q.shape)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            out, lse = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, prefix_ids=ids,
                                        return_lse=True, backend="cpu")
            results.append((out, lse, *torch.autograd.grad(out, (q, k, v, pk, pv), grad)))
    finally:
        torch.set_num_threads(before)
    for first, other in zip(results[0], results[1]):
        assert torch.equal(first, other)
    for first, other in zip(results[0], results[2]):
        assert torch.equal(first, other)


# ---------------------------------------------------------------- build and fallback

def test_disabled_extension_falls_back_to_reference():
    result = _run(
        """
        import json, torch
        from prefix_kernels import cpu, prefix_attention, prefix_attention_reference
        from helpers import Case
        q, k, v, pk, pv, mask, ids = Case(padding="left", n_prefixes=2).make(torch.float32, "cpu")
        out = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, prefix_ids=ids, backend="auto")
        ref, _ = prefix_attention_reference(q, k, v, pk, pv, key_padding_mask=mask, prefix_ids=ids)
        try:
            prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, prefix_ids=ids, backend="cpu")
            error = None
        except ValueError as exc:
            error = str(exc)
        print(json.dumps(dict(same=torch.equal(out, ref), available=cpu.is_available(),
                              reason=cpu.unavailable_reason(), error=error,
                              op_loaded=hasattr(torch.ops.prefix_kernels, "fwd_cpu"))))
        """,
        PREFIX_KERNELS_DISABLE_CPU_EXT="1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["same"] and not info["available"] and not info["op_loaded"]
    assert "PREFIX_KERNELS_DISABLE_CPU_EXT" in info["reason"]
    assert info["error"] and "backend='cpu' is unavailable" in info["error"]
    assert "PREFIX_KERNELS_DISABLE_CPU_EXT" in info["error"]
    assert "Warning" not in result.stderr  # disabling on purpose is not worth a warning


def test_failed_build_warns_once_and_falls_back():
    result = _run(
        """
        import json, warnings, torch
        import prefix_kernels.cpu as cpu
        from prefix_kernels import prefix_attention
        assert not cpu._state["tried"]  # importing builds nothing
        cpu._source_dir = lambda: None  # as if the sources were missing
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = cpu.is_available(), cpu.is_available()
            out = prefix_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4),
                                   torch.randn(2, 1, 4), torch.randn(2, 1, 4), backend="auto")
        print(json.dumps(dict(first=first, second=second, warnings=[str(w.message) for w in caught],
                              reason=cpu.unavailable_reason(), finite=bool(torch.isfinite(out).all()))))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["first"] is False and info["second"] is False and info["finite"]
    assert len(info["warnings"]) == 1 and "sources" in info["warnings"][0]
    assert "building the C++ CPU op failed" in info["reason"]
