"""The C++ CPU op's model-family features (issue 13) against the fp64 reference:
sliding windows (Mistral, Gemma 2, gpt-oss), a value head dim of its own, softcapping (Gemma 2)
and attention sinks (gpt-oss), alone and combined.

The op is called through ``cpu.prefix_attention_cpu`` (the public validation is functional.py's).
Tolerance: flash-attention's rule as in helpers.check_against_reference -- err(op) <= 2 x
err(same-dtype reference) + atol for out (3 x for gradients), both against fp64.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from prefix_kernels import cpu
from prefix_kernels.reference import prefix_attention_reference
from helpers import ATOL, assert_close_by_rule, max_err, need

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("q", "k", "v", "prefix_k", "prefix_v", "sinks")


@pytest.fixture(scope="module", autouse=True)
def ext():
    need("cpu")


@dataclass(frozen=True)
class Problem:
    """One attention problem with the features; :meth:`make` draws its tensors (this file's builder:
    helpers.Case has no value head dim nor sinks)."""

    batch: int = 2
    heads: int = 4
    kv_heads: int = 2
    n_queries: int = 24
    n_keys: int = 40
    n_prefix: int = 5
    head_dim: int = 16
    v_dim: int | None = None  # None: head_dim
    n_prefixes: int | None = None  # a bank [T, Hkv, P, D] with random prefix_ids; None: one shared prefix
    causal: bool = True
    padding: str | None = None  # None, "left" (row lengths 1..M), "dead" (keys kept w.p. 0.6, row 0 fully padded)
    bshd: bool = False  # q/k/v/grad as transposed [B, S, H, D] views (HF's layout)
    q_mul: float = 1.0  # scales q: larger scores, so that softcaps bite
    sliding_window: int | None = None
    softcap: float | None = None
    sinks: bool = False

    def make(self, dtype, seed=0):
        """(tensors q, k, v, prefix_k, prefix_v[, sinks]; fixed kwargs; grad_out), fp32 draws cast."""
        gen = torch.Generator().manual_seed(seed)
        b, hq, hkv, n, m, p, d = (self.batch, self.heads, self.kv_heads, self.n_queries, self.n_keys,
                                  self.n_prefix, self.head_dim)
        dv = self.v_dim or d

        def seq(h, s, width, mul=1.0):
            if self.bshd:
                return (torch.randn(b, s, h, width, generator=gen) * mul).to(dtype).transpose(1, 2)
            return (torch.randn(b, h, s, width, generator=gen) * mul).to(dtype)

        lead = () if self.n_prefixes is None else (self.n_prefixes,)
        tensors = [seq(hq, n, d, self.q_mul), seq(hkv, m, d), seq(hkv, m, dv),
                   torch.randn(*lead, hkv, p, d, generator=gen).to(dtype),
                   torch.randn(*lead, hkv, p, dv, generator=gen).to(dtype)]
        if self.sinks:
            tensors.append((2 * torch.randn(hq, generator=gen)).to(dtype))
        mask = None
        if self.padding == "left":
            lengths = torch.randint(1, m + 1, (b,), generator=gen)
            mask = torch.arange(m)[None, :] >= (m - lengths)[:, None]
        elif self.padding == "dead":
            mask = torch.rand(b, m, generator=gen) < 0.6
            mask[0] = False
        ids = None if self.n_prefixes is None else torch.randint(0, self.n_prefixes, (b,), generator=gen)
        grad = seq(hq, n, dv)
        kwargs = dict(causal=self.causal, scale=d**-0.5, key_padding_mask=mask, prefix_ids=ids,
                      sliding_window=self.sliding_window, softcap=self.softcap)
        return tensors, kwargs, grad


def _op(tensors, kwargs):
    q, k, v, pk, pv, *sinks = tensors
    return cpu.prefix_attention_cpu(q, k, v, pk, pv, sinks=sinks[0] if sinks else None, **kwargs)


def _reference(tensors, kwargs, **extra):
    q, k, v, pk, pv, *sinks = tensors
    return prefix_attention_reference(q, k, v, pk, pv, sinks=sinks[0] if sinks else None, **kwargs, **extra)


def check(problem: Problem, dtype=torch.float32, seed=0, requires_grad=None):
    """out, lse and the gradients of the inputs flagged in ``requires_grad`` (default: all) of the op
    against the fp64 reference, the same-dtype reference setting the error budget."""
    tensors, kwargs, grad = problem.make(dtype, seed)
    flags = requires_grad or (True,) * len(tensors)
    leaves = [t.detach().requires_grad_(f) for t, f in zip(tensors, flags)]
    wanted = [t for t in leaves if t.requires_grad]
    out, lse = _op(leaves, kwargs)
    grads = torch.autograd.grad(out, wanted, grad)

    leaves64 = [t.detach().double().requires_grad_(f) for t, f in zip(tensors, flags)]
    out64, lse64 = _reference(leaves64, kwargs)
    grads64 = torch.autograd.grad(out64, [t for t in leaves64 if t.requires_grad], grad.double())
    same = [t.detach().clone().requires_grad_(f) for t, f in zip(tensors, flags)]
    out_same, _ = _reference(same, kwargs, upcast=False)
    grads_same = torch.autograd.grad(out_same, [t for t in same if t.requires_grad], grad)

    dv = problem.v_dim or problem.head_dim
    assert out.shape == (*tensors[0].shape[:3], dv) and out.dtype == dtype
    assert lse.shape == tensors[0].shape[:3] and lse.dtype == torch.float32 and not lse.requires_grad
    atol = ATOL[dtype]
    assert_close_by_rule("out", out, out_same, out64, 2, atol)
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf rows differ from the reference"
    top = lse64[finite].abs().max().item() if finite.any() else 1.0
    assert max_err(lse[finite], lse64[finite]) <= 1e-4 * max(1.0, top), "lse"
    names = [name for name, f in zip(NAMES, flags) if f]
    for name, g, g_same, g64 in zip(names, grads, grads_same, grads64):
        assert g.shape == g64.shape and g.dtype == dtype, name
        assert_close_by_rule("d" + name, g, g_same, g64, 3, 2 * atol)
    return out, lse, dict(zip(names, grads))


# ---------------------------------------------------------------- 1. sliding window

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
@pytest.mark.parametrize("window", [1, 7, 40, 100], ids=lambda w: f"W={w}")  # M = 40: shorter, equal, longer
def test_sliding_window(window, causal):
    check(Problem(sliding_window=window, causal=causal, padding="left"))


@pytest.mark.parametrize("name, problem", [
    # several query blocks and key tiles (BK = 128): tiles before every window are skipped
    ("blocks", Problem(batch=2, heads=6, kv_heads=2, n_queries=300, n_keys=420, n_prefix=130, head_dim=32,
                       sliding_window=100, padding="left", n_prefixes=2, bshd=True)),
    ("blocks non-causal", Problem(batch=1, heads=2, kv_heads=1, n_queries=260, n_keys=300, n_prefix=3,
                                  head_dim=24, sliding_window=90, causal=False)),
    # decode: one query (few-row tiles, BK = 512) against a long cache, the window well inside it
    ("decode", Problem(batch=3, heads=8, kv_heads=2, n_queries=1, n_keys=1500, n_prefix=20, head_dim=64,
                       sliding_window=300, padding="left")),
    ("decode W=1", Problem(batch=2, heads=4, kv_heads=1, n_queries=1, n_keys=700, n_prefix=0,
                           head_dim=32, sliding_window=1)),
], ids=lambda x: x if isinstance(x, str) else "")
def test_sliding_window_large(name, problem):
    check(problem)


def test_window_hides_everything_but_the_prefix():
    """Non-causal with M < N: early queries' windows end before key 0; they see only the prefix
    (P > 0) or nothing (P = 0: out = 0, lse = -inf, zero gradients)."""
    check(Problem(n_queries=20, n_keys=6, causal=False, sliding_window=3))
    _, lse, grads = check(Problem(n_queries=20, n_keys=6, n_prefix=0, causal=False, sliding_window=3))
    assert torch.isinf(lse[:, :, :12]).all() and torch.isfinite(lse[:, :, 12:]).all()
    assert (grads["q"][:, :, :12] == 0).all()


def test_window_and_sinks_at_huge_logits():
    """Logits ~1e5 with a window and sinks: the softmax saturates to the argmax; out and lse match the
    reference, gradients stay finite, within the few-percent limit of an fp32 lse at |lse| ~ 1e5
    (as test_edge_inputs.py's huge-logit tests of the plain op)."""
    tensors, kwargs, grad = Problem(q_mul=1e4, sliding_window=5, sinks=True, n_queries=9, n_keys=12).make(
        torch.float32)
    leaves = [t.detach().requires_grad_() for t in tensors]
    out, lse = _op(leaves, kwargs)
    grads = torch.autograd.grad(out, leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in tensors]
    out64, lse64 = _reference(leaves64, kwargs)
    grads64 = torch.autograd.grad(out64, leaves64, grad.double())
    assert max_err(out, out64) <= 1e-5 and max_err(lse, lse64) <= 1e-6 * lse64.abs().max().item()
    size = max(g.abs().max().item() for g in grads64)
    for name, g, g64 in zip(NAMES, grads, grads64):
        assert torch.isfinite(g).all() and max_err(g, g64) <= 0.06 * size, name


# ---------------------------------------------------------------- 2. value head dim

@pytest.mark.parametrize("d, dv", [(16, 24), (40, 8), (64, 128), (8, 1)], ids=lambda x: str(x))
def test_value_head_dim(d, dv):
    check(Problem(head_dim=d, v_dim=dv, n_prefixes=3, batch=4, padding="left", bshd=True))


def test_value_head_dim_decode_and_blocks():
    check(Problem(batch=2, heads=8, kv_heads=2, n_queries=1, n_keys=900, n_prefix=140, head_dim=64,
                  v_dim=32, padding="left"))
    check(Problem(batch=1, heads=4, kv_heads=2, n_queries=150, n_keys=200, n_prefix=130, head_dim=24,
                  v_dim=40, n_prefixes=2))


def test_value_head_dim_out_layout_follows_q():
    tensors, kwargs, _ = Problem(head_dim=16, v_dim=24, bshd=True).make(torch.float32)
    out, _ = _op(tensors, kwargs)
    assert out.shape[-1] == 24 and out.transpose(1, 2).is_contiguous()


# ---------------------------------------------------------------- 3. softcap

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
@pytest.mark.parametrize("softcap", [0.7, 5.0, 1e4], ids=lambda c: f"c={c:g}")
def test_softcap(softcap, causal):
    check(Problem(softcap=softcap, causal=causal, q_mul=4.0, padding="left", n_prefixes=2))


def test_softcap_bounds_huge_logits():
    """Capped scores stay in [-c, c]: logits ~1e6 give the same result as the reference, no NaN."""
    check(Problem(softcap=30.0, q_mul=1e5, n_queries=9, n_keys=12))


# ---------------------------------------------------------------- 4. sinks

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_sinks(causal):
    check(Problem(sinks=True, causal=causal, padding="left", n_prefixes=2))


def test_sinks_rows_that_see_nothing():
    """No prefix and every key padded: out = 0, lse = the sink (finite), zero gradients but the sink's."""
    problem = Problem(sinks=True, n_prefix=0, padding="dead", n_queries=6, n_keys=9)
    out, lse, grads = check(problem)
    sinks = problem.make(torch.float32)[0][5]
    assert (out[0] == 0).all()
    torch.testing.assert_close(lse[0], sinks[:, None].expand(-1, 6), rtol=0, atol=1e-6)
    assert (grads["q"][0] == 0).all() and (grads["k"][0] == 0).all()


def test_sinks_gradcheck_float64():
    problem = Problem(batch=2, heads=4, kv_heads=2, n_queries=5, n_keys=7, n_prefix=3, head_dim=8, v_dim=6,
                      sinks=True, sliding_window=3, softcap=2.0, padding="left", n_prefixes=2)
    tensors, kwargs, _ = problem.make(torch.float64)
    leaves = [t.detach().requires_grad_() for t in tensors]
    assert torch.autograd.gradcheck(lambda *t: _op(t, kwargs)[0], leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_sinks_fp32_with_bf16_inputs():
    tensors, kwargs, grad = Problem(sinks=True, sliding_window=9).make(torch.bfloat16)
    sinks32 = tensors[5].float().requires_grad_()
    out, _ = _op([*tensors[:5], sinks32], kwargs)
    (dsinks,) = torch.autograd.grad(out, sinks32, grad)
    out64, _ = _reference([t.double() for t in tensors[:5]] + [sinks32.detach().double().requires_grad_()], kwargs)
    assert dsinks.dtype == torch.float32 and max_err(out, out64) < 2e-2


# ---------------------------------------------------------------- combined, as model families use them

FAMILIES = {
    # gpt-oss: sliding-window layers with sinks, GQA 8:2
    "gpt-oss": Problem(heads=8, kv_heads=2, n_queries=40, n_keys=70, sliding_window=16, sinks=True,
                       padding="left", n_prefixes=2),
    "gpt-oss decode": Problem(heads=8, kv_heads=2, n_queries=1, n_keys=600, sliding_window=128, sinks=True),
    # Gemma 2: sliding window + softcap 50 (scores well inside the cap unless q is large)
    "gemma2": Problem(heads=4, kv_heads=2, n_queries=33, n_keys=50, sliding_window=12, softcap=50.0, q_mul=8.0,
                      padding="left"),
    "everything": Problem(heads=6, kv_heads=3, n_queries=30, n_keys=45, head_dim=24, v_dim=12, n_prefixes=3,
                          batch=3, sliding_window=10, softcap=3.0, sinks=True, padding="dead", bshd=True,
                          q_mul=3.0, causal=False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_families(family, dtype):
    check(FAMILIES[family], dtype)


def test_portable_kernels(monkeypatch):
    """The non-AVX2 build of the kernels (picked per call from PREFIX_KERNELS_CPU_ISA)."""
    monkeypatch.setenv("PREFIX_KERNELS_CPU_ISA", "base")
    assert "isa=base" in cpu.build_info()
    check(FAMILIES["everything"])
    check(FAMILIES["gpt-oss decode"])


def test_aten_gemm_path():
    """With PREFIX_KERNELS_CPU_GEMM=aten (read once per process) tile products go through ATen."""
    code = textwrap.dedent("""
        import torch
        from prefix_kernels import cpu
        from test_cpu_features import FAMILIES, check
        assert "gemm=aten" in cpu.build_info(), cpu.build_info()
        check(FAMILIES["everything"])
        check(FAMILIES["gemma2"], torch.float64)
        print("ok")
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "PREFIX_KERNELS_CPU_GEMM": "aten"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_bit_identical_across_thread_counts():
    tensors, kwargs, grad = replace(FAMILIES["everything"], n_queries=150, n_keys=200, sliding_window=60).make(
        torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = [t.detach().requires_grad_() for t in tensors]
            out, lse = _op(leaves, kwargs)
            results.append((out, lse, *torch.autograd.grad(out, leaves, grad)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- only the needed gradients

@pytest.mark.parametrize("flags", [
    (False, False, False, True, True, False),  # prefix tuning of a frozen layer 0
    (False, False, False, False, False, True),  # the sinks alone
    (True, False, True, False, False, True),
], ids=["prefix", "sinks", "q-v-sinks"])
def test_only_needed_gradients(flags):
    check(replace(FAMILIES["everything"], causal=True), requires_grad=flags)


def test_backward_op_skips_unneeded_grads():
    tensors, kwargs, grad = FAMILIES["everything"].make(torch.float32)
    q, k, v, pk, pv, sinks = tensors
    features = (kwargs["sliding_window"], kwargs["softcap"], sinks)
    fixed = (kwargs["key_padding_mask"], kwargs["prefix_ids"], kwargs["causal"], kwargs["scale"])
    out, lse = torch.ops.prefix_kernels.fwd_cpu(q, k, v, pk, pv, *fixed, *features)
    bwd = torch.ops.prefix_kernels.bwd_cpu
    full = bwd(grad, q, k, v, pk, pv, out, lse, *fixed, [True] * 6, *features)
    part = bwd(grad, q, k, v, pk, pv, out, lse, *fixed, [False, True, False, False, True, True], *features)
    assert [g.numel() > 0 for g in part] == [False, True, False, False, True, True]
    for i in (1, 4, 5):
        assert torch.equal(part[i], full[i])
    assert len(bwd(grad, q, k, v, pk, pv, out, lse, *fixed, [True] * 5, *features)) == 5


# ---------------------------------------------------------------- op checks

def _op_args():
    tensors, kwargs, grad = replace(FAMILIES["everything"], n_queries=5, n_keys=7, heads=4, kv_heads=2,
                                    head_dim=8, v_dim=4).make(torch.float32)
    fixed = (kwargs["key_padding_mask"], kwargs["prefix_ids"], kwargs["causal"], kwargs["scale"])
    return tensors, fixed, (kwargs["sliding_window"], kwargs["softcap"]), grad


def test_opcheck_fwd():
    (q, k, v, pk, pv, sinks), fixed, (window, cap), _ = _op_args()
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv, sinks)]
    torch.library.opcheck(torch.ops.prefix_kernels.fwd_cpu.default, (*leaves[:5], *fixed, window, cap, leaves[5]))
    torch.library.opcheck(torch.ops.prefix_kernels.fwd_cpu.default, (*leaves[:5], *fixed, window, None, None))


def test_opcheck_bwd():
    (q, k, v, pk, pv, sinks), fixed, (window, cap), grad = _op_args()
    out, lse = torch.ops.prefix_kernels.fwd_cpu(q, k, v, pk, pv, *fixed, window, cap, sinks)
    for output_mask in ([True] * 6, [False, True, False, True, False, True]):
        args = (grad, q, k, v, pk, pv, out, lse, *fixed, output_mask, window, cap, sinks)
        torch.library.opcheck(torch.ops.prefix_kernels.bwd_cpu.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_registered_autograd_of_the_op():
    """fwd_cpu is differentiable on its own (register_autograd), sinks included, like prefix_attention_cpu."""
    tensors, fixed, (window, cap), grad = _op_args()
    leaves = [t.requires_grad_() for t in tensors]
    out, _ = torch.ops.prefix_kernels.fwd_cpu(*leaves[:5], *fixed, window, cap, leaves[5])
    got = torch.autograd.grad(out, leaves, grad)
    mask, ids, causal, scale = fixed
    out2, _ = cpu.prefix_attention_cpu(*leaves[:5], causal=causal, scale=scale, key_padding_mask=mask,
                                       prefix_ids=ids, sliding_window=window, softcap=cap, sinks=leaves[5])
    for g, w in zip(got, torch.autograd.grad(out2, leaves, grad)):
        assert torch.equal(g, w)


def test_torch_compile_matches_eager():
    """The features trace under torch.compile (fake impls: out's Dv, dsinks) with no graph break."""
    tensors, kwargs, grad = replace(FAMILIES["everything"], bshd=False).make(torch.float32)

    def fn(*leaves):
        out, lse = _op(leaves, kwargs)
        return out * 2, lse

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out, lse = f(*leaves)
        results.append((out, lse, *torch.autograd.grad(out, leaves, grad)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_op_checks_name_the_argument():
    (q, k, v, pk, pv, sinks), fixed, _, _ = _op_args()
    op = torch.ops.prefix_kernels.fwd_cpu
    with pytest.raises(RuntimeError, match=r"sliding_window must be an int >= 1 \(or None\), got 0"):
        op(q, k, v, pk, pv, *fixed, 0, None, None)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(RuntimeError, match=r"softcap must be a positive finite float \(or None\)"):
            op(q, k, v, pk, pv, *fixed, None, bad, None)
    with pytest.raises(RuntimeError, match=r"sinks must be \[Hq=4\] \(one logit per query head\), got \[2\]"):
        op(q, k, v, pk, pv, *fixed, None, None, sinks[:2])
    with pytest.raises(RuntimeError, match=r"sinks must have q's dtype Float or float32, got Long"):
        op(q, k, v, pk, pv, *fixed, None, None, sinks.long())
    with pytest.raises(RuntimeError, match=r"prefix_v must have prefix_k's shape \[3, 2, 5, 8\] with v's head dim Dv=4"):
        op(q, k, v, pk, pk, *fixed, None, None, None)
    with pytest.raises(RuntimeError, match=r"v must be \[B=3, Hkv=2, M=7, Dv\]"):
        op(q, k, v[:, :, :6], pk, pv, *fixed, None, None, None)
    out, lse = op(q, k, v, pk, pv, *fixed, None, None, None)
    with pytest.raises(RuntimeError, match=r"output_mask must hold 5 flags .* got 6 without sinks"):
        torch.ops.prefix_kernels.bwd_cpu(out, q, k, v, pk, pv, out, lse, *fixed, [True] * 6)
    with pytest.raises(RuntimeError, match=r"grad_out must be \[B=3, Hq=4, N=5, Dv=4\]"):
        torch.ops.prefix_kernels.bwd_cpu(q, q, k, v, pk, pv, out, lse, *fixed, [True] * 5)
