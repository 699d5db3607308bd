"""Edge inputs, per backend: empty sizes, single tokens, fully padded rows, huge logits, fp16 near
overflow, NaN/inf in the inputs and very long prefixes.

Backends: "reference", "cpu" (the C++ op; skipped when it cannot be built) and "triton" (on CUDA
tensors when there is a GPU, else the interpreter on CPU tensors; tiny sizes). Each result is
compared with the fp64 reference. Known bugs are pinned by ``xfail(strict=True)`` tests or
parameters whose reasons say what is wrong; the ones that crash the interpreter (segfault,
SIGFPE) run in a subprocess.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import ATOL, TRITON_RUNNABLE, Case, backend_device, max_err, need
from prefix_kernels import prefix_attention, prefix_attention_reference

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["reference", "cpu", "triton"]
NAMES = ("q", "k", "v", "prefix_k", "prefix_v")
NAN, INF = float("nan"), float("inf")
# numpy (the Triton interpreter) warns when inf/NaN flow through it, which is what these tests do
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


SMALL = Case(batch=2, heads=2, kv_heads=1, n_queries=3, n_keys=5, n_prefix=2, head_dim=8, with_ids=False)


def make(dtype=torch.float32, seed=0, **sizes):
    """[q, k, v, prefix_k, prefix_v] of ``SMALL`` with ``sizes`` (Case fields) replaced: plain CPU
    tensors (callers make leaves; the tests pick masks and prefix_ids themselves)."""
    return list(replace(SMALL, **sizes).make(dtype, "cpu", seed, requires_grad=False).tensors)


def leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def run(backend, tensors, grad_out=None, **kwargs):
    """(out, lse, the five grads or None) from ``backend``, on the CPU; grads only when grad_out is
    given. Triton runs on DEVICE (CUDA when there is a GPU)."""
    dev = backend_device(backend)
    xs = [t.detach().to(dev).clone().requires_grad_() for t in tensors]
    kwargs = {n: a.to(dev) if isinstance(a, torch.Tensor) else a for n, a in kwargs.items()}
    out, lse = prefix_attention(*xs, return_lse=True, backend=backend, **kwargs)
    grads = None
    if grad_out is not None:
        grads = torch.autograd.grad(out, xs, grad_out.to(dev), allow_unused=True)
        grads = [(torch.zeros_like(x) if g is None else g).cpu() for g, x in zip(grads, xs)]
    return out.detach().cpu(), lse.cpu(), grads


def truth(tensors, grad_out=None, **kwargs):
    """The fp64 reference: (out, lse, grads or None)."""
    xs = [t.detach().double().requires_grad_() for t in tensors]
    out, lse = prefix_attention_reference(*xs, **kwargs)
    grads = None
    if grad_out is not None:
        grads = torch.autograd.grad(out, xs, grad_out.double(), allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]
    return out, lse, grads


def same_dtype(tensors, grad_out=None, **kwargs):
    """The reference in the inputs' dtype (upcast=False): flash-attention's error yardstick."""
    xs = leaves(tensors)
    out, _ = prefix_attention_reference(*xs, upcast=False, **kwargs)
    grads = None
    if grad_out is not None:
        grads = torch.autograd.grad(out, xs, grad_out, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]
    return out, grads


def check_by_rule(backend, tensors, seed=1, **kwargs):
    """out, lse and all five gradients against the fp64 reference (flash-attention's rule, with atol
    relative to the size of the true values)."""
    dtype = tensors[0].dtype
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(tensors[0].shape, generator=g).to(dtype)
    out, lse, grads = run(backend, tensors, go, **kwargs)
    out64, lse64, grads64 = truth(tensors, go, **kwargs)
    out_s, grads_s = same_dtype(tensors, go, **kwargs)
    atol = ATOL[dtype]
    assert out.shape == tensors[0].shape and out.dtype == dtype and lse.dtype == torch.float32
    for name, got, ref, t64, factor, tol in [("out", out, out_s, out64, 2, atol)] + [
        (n, a, b, c, 3, 2 * atol)
        for n, a, b, c in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, grads_s, grads64)
    ]:
        assert not torch.isnan(got).any(), f"{name}: NaN"
        size = max(1.0, t64.abs().max().item()) if t64.numel() else 1.0
        err, ref_err = max_err(got, t64), max_err(ref, t64)
        assert err <= factor * ref_err + tol * size, f"{name}: err {err:.3e}, torch err {ref_err:.3e}"
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.equal(lse[~finite], lse64[~finite].float())
    if finite.any():
        assert max_err(lse[finite], lse64[finite]) <= 1e-4 * max(1.0, lse64[finite].abs().max().item())
    return out, lse, grads


def _subprocess(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- empty and tiny sizes

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bank", [False, True], ids=["shared", "bank+ids+mask"])
def test_empty_batch(backend, with_bank):
    """B = 0: empty out/lse of the right shapes, all-zero gradients of the right shapes."""
    need(backend)
    tensors = make(batch=0, n_prefixes=3 if with_bank else None)
    kwargs = {}
    if with_bank:
        kwargs = dict(prefix_ids=torch.zeros(0, dtype=torch.long), key_padding_mask=torch.ones(0, 5, dtype=torch.bool))
    go = torch.zeros(tensors[0].shape)
    out, lse, grads = run(backend, tensors, go, **kwargs)
    assert out.shape == (0, 2, 3, 8) and lse.shape == (0, 2, 3)
    for g, t in zip(grads, tensors):
        assert g.shape == t.shape and not g.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal, M", [(True, 0), (True, 6), (False, 0), (False, 4)])
def test_no_queries(backend, causal, M):
    """N = 0 (with or without keys): empty out/lse, all-zero gradients."""
    need(backend)
    tensors = make(n_queries=0, n_keys=M, n_prefix=3)
    out, lse, grads = run(backend, tensors, torch.zeros(2, 2, 0, 8), causal=causal)
    assert out.shape == (2, 2, 0, 8) and lse.shape == (2, 2, 0)
    for g, t in zip(grads, tensors):
        assert g.shape == t.shape and not g.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", [False, True])
def test_no_prefix(backend, padding):
    """P = 0: plain attention over the sequence; the prefix gradients are empty [Hkv, 0, D]."""
    need(backend)
    tensors = make(batch=3, heads=4, kv_heads=2, n_queries=4, n_keys=7, n_prefix=0, head_dim=16)
    mask = None
    if padding:
        mask = torch.ones(3, 7, dtype=torch.bool)
        mask[0, :5] = False  # left padding: row 0's first queries see a single key
        mask[1, 6] = False  # right padding: the last key is hidden
    _, _, grads = check_by_rule(backend, tensors, key_padding_mask=mask)
    assert grads[3].shape == (2, 0, 16) and grads[4].shape == (2, 0, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_keys_at_all(backend):
    """P = M = 0 (non-causal): every query sees nothing: out 0, lse -inf, zero gradients."""
    need(backend)
    tensors = make(n_keys=0, n_prefix=0)
    out, lse, grads = run(backend, tensors, torch.randn(2, 2, 3, 8), causal=False)
    assert (out == 0).all() and (lse == -INF).all()
    for g, t in zip(grads, tensors):
        assert g.shape == t.shape and not g.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("P", [0, 1, 3])
@pytest.mark.parametrize("visible", [True, False])
def test_single_query_single_key(backend, P, visible):
    """M = N = 1 (decode with an empty cache), with and without the key padded out."""
    need(backend)
    tensors = make(batch=2, heads=3, kv_heads=1, n_queries=1, n_keys=1, n_prefix=P, head_dim=16)
    mask = torch.tensor([[visible], [True]])
    out, lse, _ = check_by_rule(backend, tensors, key_padding_mask=mask)
    if P == 0 and visible:  # one visible key: out is its value, exactly
        assert torch.equal(out[:, :, 0], tensors[2][:, :, 0].expand(2, 3, 16))
    if P == 0 and not visible:
        assert (out[0] == 0).all() and (lse[0] == -INF).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_query_heads(backend):
    """Hq = 0 (a multiple of any Hkv, so accepted): empty out, zero gradients."""
    need(backend)
    tensors = make(heads=0)
    out, lse, grads = run(backend, tensors, torch.zeros(2, 0, 3, 8))
    assert out.shape == (2, 0, 3, 8) and lse.shape == (2, 0, 3)
    for g, t in zip(grads, tensors):
        assert g.shape == t.shape and not g.any()


def test_cpu_zero_query_heads_does_not_crash():
    """In a subprocess: this input once killed the process with SIGFPE (rows / G with G = 0 in
    csrc/prefix_attention.cpp)."""
    need("cpu")
    result = _subprocess("""
        from prefix_kernels import prefix_attention
        from test_edge_inputs import make
        q, k, v, pk, pv = make(heads=0, n_keys=3)
        q.requires_grad_()
        try:
            out = prefix_attention(q, k, v, pk, pv, backend="cpu")
            assert out.shape == (2, 0, 3, 8)
            out.sum().backward()
            print("computed")
        except (TypeError, ValueError) as exc:
            print("refused", exc)
        """)
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    assert "computed" in result.stdout or "refused" in result.stdout


# ---------------------------------------------------------------- a bank of zero prefixes

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_prefix_bank_is_refused(backend):
    """A [0, Hkv, P, D] bank without prefix_ids: no prefix to use, a ValueError naming prefix_k."""
    need(backend)
    with pytest.raises(ValueError, match=r"prefix_k holds no prefix \(T=0"):
        prefix_attention(*make(n_prefixes=0), backend=backend)


@pytest.mark.skipif(not TRITON_RUNNABLE, reason="needs CUDA or TRITON_INTERPRET=1")
def test_empty_prefix_bank_is_refused_triton():
    """In a subprocess: before validation refused it, the interpreter segfaulted on this input."""
    result = _subprocess("""
        import torch
        from prefix_kernels import prefix_attention
        from test_edge_inputs import make
        try:
            prefix_attention(*make(n_prefixes=0), backend="triton")
            print("accepted")
        except (TypeError, ValueError) as exc:
            print("refused", exc)
        """)
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    assert "refused" in result.stdout and "prefix_k holds no prefix" in result.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_prefix_bank_with_empty_batch(backend):
    """B = 0 and T = 0 with prefix_ids of shape [0]: nothing to compute; either an empty result or
    a clean refusal."""
    need(backend)
    tensors = make(batch=0, n_prefixes=0)
    try:
        out, _, _ = run(backend, tensors, prefix_ids=torch.zeros(0, dtype=torch.long))
    except (TypeError, ValueError) as exc:
        assert "prefix" in str(exc)
        return
    assert out.shape == tensors[0].shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_prefix_bank_with_ids_is_refused(backend):
    """T = 0 with prefix_ids for B > 0 rows: no id can be in range, a clean ValueError."""
    need(backend)
    with pytest.raises(ValueError, match=r"prefix_ids must be in \[0, T=0\)"):
        run(backend, make(n_prefixes=0), prefix_ids=torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------- fully padded rows

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_all_keys_padded_without_prefix(backend, causal):
    """P = 0 and every key of row 0 padded: its queries see nothing -> out 0, lse -inf, zero
    gradients, and no NaN anywhere; row 1 is unaffected."""
    need(backend)
    tensors = make(batch=2, heads=4, kv_heads=2, n_queries=4, n_keys=6, n_prefix=0, head_dim=16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0] = False
    out, lse, grads = check_by_rule(backend, tensors, causal=causal, key_padding_mask=mask)
    assert (out[0] == 0).all() and (lse[0] == -INF).all()
    assert torch.isfinite(lse[1]).all()
    dq, dk, dv, dpk, dpv = grads
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert dpk.shape == (2, 0, 16) and dpv.shape == (2, 0, 16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bank", [False, True])
def test_all_keys_padded_with_prefix(backend, bank):
    """P > 0 and every sequence key padded: each query attends to its prefix only."""
    need(backend)
    B, Hq, Hkv, N, M, P, D = 3, 4, 2, 4, 6, 5, 16
    tensors = make(batch=B, heads=Hq, kv_heads=Hkv, n_queries=N, n_keys=M, n_prefix=P, head_dim=D,
                   n_prefixes=2 if bank else None)
    ids = torch.tensor([1, 0, 1]) if bank else None
    mask = torch.zeros(B, M, dtype=torch.bool)
    out, lse, grads = check_by_rule(backend, tensors, key_padding_mask=mask, prefix_ids=ids)
    # by hand, in fp64: softmax over the row's prefix only
    q, _, _, pk, pv = (t.double() for t in tensors)
    if bank:
        pk, pv = pk[ids], pv[ids]
    else:
        pk, pv = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
    pk, pv = pk.repeat_interleave(Hq // Hkv, 1), pv.repeat_interleave(Hq // Hkv, 1)
    scores = q @ pk.transpose(-1, -2) / math.sqrt(D)
    want = torch.softmax(scores, -1) @ pv
    assert max_err(out, want) <= 1e-5
    assert max_err(lse, torch.logsumexp(scores, -1)) <= 1e-5
    assert (grads[1] == 0).all() and (grads[2] == 0).all()  # padded keys get no gradient


# ---------------------------------------------------------------- huge logits

def _big_logit_grads_ok(grads, grads64):
    """The backward recomputes P = exp(s - lse) from the fp32 LSE, whose ulp at |lse| ~ 1e5 is
    ~0.008: P is off by up to ~1-2 %, so the gradients carry a relative error of a few percent
    (flash-attention has the same limit). This guards against inf/NaN and garbage."""
    size = max(1.0, max(g.abs().max().item() for g in grads64 if g.numel()))
    for name, g, g64 in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, grads64):
        assert torch.isfinite(g).all(), f"{name}: not finite"
        assert max_err(g, g64) <= 0.06 * size, f"{name}: err {max_err(g, g64):.3e} (size {size:.3g})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["scale=1e4", "q*1e4"])
def test_logits_scaled_by_1e4(backend, how):
    """The softmax saturates to the argmax: out is the argmax key's value (finite, equal to the
    reference's), lse equals the reference's to fp32 precision, gradients stay finite."""
    need(backend)
    tensors = make(batch=2, heads=2, kv_heads=1, n_queries=4, n_keys=6, n_prefix=3, head_dim=16)
    kwargs = dict(key_padding_mask=torch.tensor([[False, True, True, True, True, True], [True] * 6]))
    if how == "scale=1e4":
        kwargs["scale"] = 1e4
    else:
        tensors[0] = tensors[0] * 1e4
    go = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(1))
    out, lse, grads = run(backend, tensors, go, **kwargs)
    out64, lse64, grads64 = truth(tensors, go, **kwargs)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert max_err(out, out64) <= 1e-5
    assert max_err(lse, lse64) <= 1e-6 * lse64.abs().max().item()
    # the premise: the reference's out is (to fp64 precision) a single value row per query
    values = torch.cat([tensors[4].expand(2, -1, -1, -1), tensors[2]], 2).double().repeat_interleave(2, 1)
    assert ((out64[..., None, :] - values[:, :, None]).abs().amax(-1).amin(-1) < 1e-9).all()
    _big_logit_grads_ok(grads, grads64)


def _fp16_near_overflow(seed=0, both=False, N=4, D=16):
    """fp16 q with entries up to 6e4 (and k too when ``both``): q . k overflows fp16."""
    g = torch.Generator().manual_seed(seed)
    tensors = make(batch=2, heads=2, kv_heads=1, n_queries=N, n_keys=N + 2, n_prefix=3, head_dim=D, seed=seed)
    tensors[0] = (torch.rand(tensors[0].shape, generator=g) * 2 - 1) * 6e4
    if both:
        tensors[1] = (torch.rand(tensors[1].shape, generator=g) * 2 - 1) * 6e4
        tensors[3] = (torch.rand(tensors[3].shape, generator=g) * 2 - 1) * 6e4
    tensors = [t.half() for t in tensors]
    assert all(torch.isfinite(t).all() for t in tensors)
    q, k = tensors[0].float(), tensors[1].float().repeat_interleave(2, 1)
    assert (q @ k.transpose(-1, -2)).abs().max() > 65504  # computed in fp16, q . k would be inf
    return tensors


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_near_overflow(backend):
    """fp16 inputs whose dot products overflow fp16: fp32 accumulation gives a finite out equal to
    the reference's (to fp16 rounding), an exact lse and finite gradients."""
    need(backend)
    tensors = _fp16_near_overflow()
    go = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(1)).half()
    out, lse, grads = run(backend, tensors, go)
    out64, lse64, grads64 = truth(tensors, go)
    assert out.dtype == torch.float16 and torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert max_err(out, out64) <= 2e-3 * max(1.0, out64.abs().max().item())
    assert max_err(lse, lse64) <= 1e-6 * lse64.abs().max().item()
    _big_logit_grads_ok(grads, grads64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_extreme_logits_forward(backend):
    """q and k both up to 6e4 (logits ~1e9): the forward still gives the argmax value and the lse."""
    need(backend)
    tensors = _fp16_near_overflow(both=True, N=12, D=64)
    out, lse, _ = run(backend, tensors)
    out64, lse64, _ = truth(tensors)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert max_err(out, out64) <= 2e-3 * max(1.0, out64.abs().max().item())
    assert max_err(lse, lse64) <= 1e-6 * lse64.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_extreme_logits_backward(backend):
    """Logits ~1e10, where one fp32 ulp of a score is ~1000: a backward that recomputes P from the
    LSE (ours, flash-attention's) cannot reproduce the forward's P there unless it recomputes each
    score bit for bit (the interpreter's transposed products do not). What must hold: P <= 1, so
    every gradient is finite and no larger than the inputs allow (|P| <= 1 bounds dv by
    sum |dO|). The reference keeps P; the C++ op rounds its LSE down and recomputes few-row tiles
    with the forward's own product routine, so its scores are bit-identical and its gradients
    accurate too."""
    need(backend)
    tensors = _fp16_near_overflow(both=True, N=12, D=64)
    go = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(1)).half()
    _, _, grads = run(backend, tensors, go)
    _, _, grads64 = truth(tensors, go)
    if backend in ("reference", "cpu"):
        _big_logit_grads_ok(grads, grads64)
        return
    for name, g in zip(NAMES, grads):
        assert torch.isfinite(g).all(), f"d{name}: not finite"
    dv_bound = go.double().abs().sum(2, keepdim=True).sum(1, keepdim=True)  # [B, 1, 1, D]: all queries, heads
    assert (grads[2].double().abs() <= dv_bound + 1e-3).all()


# ---------------------------------------------------------------- NaN / inf in the inputs

# Poisoned element per input, at a place that every query of batch row 0 sees (N = 3, M = 5,
# causal: query i sits at position 2 + i; key 1 is visible to all of them).
POISON = {"q": (0, 0, 1, 2), "k": (0, 0, 1, 3), "v": (0, 0, 1, 3), "prefix_k": (0, 1, 3), "prefix_v": (0, 1, 3)}


def _poisoned(where, value):
    tensors = make(batch=2, heads=2, kv_heads=1, n_queries=3, n_keys=5, n_prefix=2, head_dim=8)
    tensors[NAMES.index(where)][POISON[where]] = value
    return tensors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", NAMES)
def test_nonfinite_input_propagates_to_out(backend, where, value):
    """NaN/inf in an input: out has NaN (and inf) in exactly the elements where the reference has
    them, the finite elements agree; batch row 1 (whose inputs are clean, unless the shared prefix
    is poisoned) matches the reference."""
    need(backend)
    tensors = _poisoned(where, value)
    out, _, _ = run(backend, tensors)
    out64, _, _ = truth(tensors)
    assert torch.equal(torch.isnan(out), torch.isnan(out64)), "NaN pattern differs from the reference"
    assert torch.equal(torch.isinf(out), torch.isinf(out64)), "inf pattern differs from the reference"
    both = torch.isfinite(out64)
    assert max_err(out[both], out64[both]) <= 1e-5
    if where not in ("prefix_k", "prefix_v"):
        assert torch.isfinite(out[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["q", "k", "prefix_k"])
def test_nonfinite_scores_are_not_hidden_in_lse(backend, where, value):
    """Where the reference's lse is NaN ours is NaN; where it is +inf ours is +inf or NaN -- never
    -inf, which means "this row saw no key"."""
    need(backend)
    tensors = _poisoned(where, value)
    _, lse, _ = run(backend, tensors)
    _, lse64, _ = truth(tensors)
    assert not torch.isfinite(lse64).all()  # the premise
    nan64, pinf64 = torch.isnan(lse64), lse64 == INF
    assert torch.isnan(lse[nan64]).all(), f"lse {lse[nan64].tolist()} where the reference has NaN"
    assert (torch.isnan(lse[pinf64]) | (lse[pinf64] == INF)).all(), f"lse {lse[pinf64].tolist()} for +inf"
    assert not (lse == -INF).any()
    finite = torch.isfinite(lse64)
    assert max_err(lse[finite], lse64[finite]) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", NAMES)
def test_nan_input_propagates_to_gradients(backend, where):
    """A NaN input: the poisoned tensor's gradient has NaN (for q, k, prefix_k), every query whose
    out is NaN has NaN in its dq, and the clean batch row's dq/dk/dv equal the reference's (not
    checked for a poisoned shared prefix, which no row escapes). Which other gradient elements
    turn NaN differs between backends (the reference multiplies masked probabilities, 0, by NaN
    in more places)."""
    need(backend)
    tensors = _poisoned(where, NAN)
    go = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(1))
    out, _, grads = run(backend, tensors, go)
    _, _, grads64 = truth(tensors, go)
    if where in ("q", "k", "prefix_k"):  # (dv = P^T dO does not involve v: a NaN in v reaches dq, dk)
        assert torch.isnan(grads[NAMES.index(where)]).any()
    nan_rows = torch.isnan(out).any(-1)
    assert torch.isnan(grads[0]).any(-1)[nan_rows].all()
    if where not in ("prefix_k", "prefix_v"):
        for g, g64 in zip(grads[:3], grads64[:3]):
            assert torch.isfinite(g[1]).all() and max_err(g[1], g64[1]) <= 1e-5


def _nan_in_padded_key():
    """Inputs with a NaN in k of key 0 of batch row 0, which the padding mask hides; and a grad_out."""
    tensors = make(batch=2, heads=2, kv_heads=1, n_queries=3, n_keys=6, n_prefix=2, head_dim=8)
    tensors[1][0, 0, 0] = NAN
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 0] = False
    return tensors, mask, torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_padded_key_does_not_leak(backend):
    """A NaN in k of a padded-out key: out, lse, dk, dv and the prefix gradients stay finite and
    equal the reference's (dq: see test_nan_in_padded_key_does_not_leak_into_dq)."""
    need(backend)
    tensors, mask, go = _nan_in_padded_key()
    out, lse, grads = run(backend, tensors, go, key_padding_mask=mask)
    out64, lse64, grads64 = truth(tensors, go, key_padding_mask=mask)
    assert torch.isfinite(out64).all() and torch.isfinite(lse64).all()  # the reference does not leak
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert max_err(out, out64) <= 1e-5 and max_err(lse, lse64) <= 1e-5
    for name, g, g64 in zip(NAMES[1:], grads[1:], grads64[1:]):
        assert torch.isfinite(g64).all() and torch.isfinite(g).all(), f"d{name}: NaN"
        assert max_err(g, g64) <= 1e-5, f"d{name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_causally_hidden_key_does_not_leak(backend):
    """Causal, N = 3 queries over M = 5 keys: key 4 is seen by the last query only. A NaN in its k
    makes that query's out NaN and leaves the earlier queries' out and lse equal to the reference's."""
    need(backend)
    tensors = make(batch=2, heads=2, kv_heads=1, n_queries=3, n_keys=5, n_prefix=2, head_dim=8)
    tensors[1][0, 0, 4] = NAN
    out, lse, _ = run(backend, tensors)
    out64, lse64, _ = truth(tensors)
    assert torch.isnan(out[0, :, 2]).all() and torch.isnan(out64[0, :, 2]).all()
    assert torch.isfinite(out[0, :, :2]).all() and torch.isfinite(lse[0, :, :2]).all()
    assert max_err(out[0, :, :2], out64[0, :, :2]) <= 1e-5
    assert max_err(lse[0, :, :2], lse64[0, :, :2]) <= 1e-5
    assert torch.isfinite(out[1]).all() and max_err(out[1], out64[1]) <= 1e-5


_LEAK = ("a NaN in v of a key that a query may not see (padded out, or after its position) still "
         "turns that query's out into NaN, in every backend including the reference: the hidden "
         "key's probability is 0, and 0 * NaN = NaN in probs @ values (reference.py), in the "
         "P @ V tile products (csrc/kernel_impl.h forward_block; kernels/forward.py _attend_blocks "
         "loads V unmasked). Documented limitation (prefix_attention's docstring), as in SDPA and "
         "flash-attention: hidden keys must hold finite values")


@pytest.mark.parametrize("backend", [
    pytest.param(b, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=_LEAK)) for b in BACKENDS])
@pytest.mark.parametrize("hidden_by", ["padding", "causality"])
def test_nan_in_hidden_value_does_not_leak(backend, hidden_by):
    need(backend)
    tensors = make(batch=2, heads=2, kv_heads=1, n_queries=3, n_keys=5, n_prefix=2, head_dim=8)
    kwargs, rows = {}, slice(0, 3)
    if hidden_by == "padding":
        mask = torch.ones(2, 5, dtype=torch.bool)
        mask[0, 0] = False
        kwargs["key_padding_mask"] = mask
        tensors[2][0, 0, 0] = NAN
    else:
        tensors[2][0, 0, 4] = NAN  # key 4: seen by query 2 only
        rows = slice(0, 2)
    clean = [t.clone() for t in tensors]
    clean[2] = torch.nan_to_num(clean[2], nan=0.0)
    out, _, _ = run(backend, tensors, **kwargs)
    want, _, _ = truth(clean, **kwargs)
    assert torch.isfinite(out[0, :, rows]).all(), "NaN of a hidden key leaked into out"
    assert max_err(out[0, :, rows], want[0, :, rows]) <= 1e-5


def test_nan_in_value_of_skipped_padding_tile_does_not_leak_cpu():
    """The CPU op skips key tiles that are all padding, so there a hidden NaN value does not leak
    (unlike the reference and Triton for the same input, see the xfail above): which outputs turn NaN
    depends on the backend and on where the tile edges fall."""
    need("cpu")
    tensors = make(batch=1, heads=2, kv_heads=1, n_queries=4, n_keys=1100, n_prefix=2, head_dim=8)
    mask = torch.ones(1, 1100, dtype=torch.bool)
    mask[0, :800] = False  # decode-like tiles of 512 keys, cut backwards from key 1100: [0, 76) is all padding
    tensors[2][0, 0, 10] = NAN
    out = prefix_attention(*tensors, key_padding_mask=mask, backend="cpu")
    ref = prefix_attention(*tensors, key_padding_mask=mask, backend="reference")
    assert torch.isfinite(out).all()
    assert torch.isnan(ref).any()


_DQ_LEAK = ("a NaN in k of a padded-out key leaks into dq in every backend, the reference included: "
            "the hidden key's dS is 0 and dq = dS @ K multiplies it by the NaN (reference autograd; "
            "csrc/kernel_impl.h backward_block; kernels/backward.py _dq_blocks loads K unmasked)")


@pytest.mark.parametrize("backend", [
    pytest.param(b, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=_DQ_LEAK)) for b in BACKENDS])
def test_nan_in_padded_key_does_not_leak_into_dq(backend):
    need(backend)
    tensors, mask, go = _nan_in_padded_key()
    _, _, grads = run(backend, tensors, go, key_padding_mask=mask)
    assert torch.isfinite(grads[0]).all(), "NaN of a padded key leaked into dq"


# ---------------------------------------------------------------- very long prefixes

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_long_prefix(backend, dtype):
    """P = 4096 with a short sequence (a prefix bank, prefix_ids and padding on the CPU backends;
    a single row and head pair under the Triton interpreter, where every block costs)."""
    need(backend)
    if backend == "triton":
        tensors = make(batch=1, heads=2, kv_heads=1, n_queries=3, n_keys=4, n_prefix=4096, head_dim=16, dtype=dtype)
        check_by_rule(backend, tensors)
        return
    tensors = make(batch=3, heads=4, kv_heads=2, n_queries=5, n_keys=8, n_prefix=4096, head_dim=64, n_prefixes=2,
                   dtype=dtype)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, :6] = False
    mask[2] = False  # only the prefix
    check_by_rule(backend, tensors, key_padding_mask=mask, prefix_ids=torch.tensor([1, 0, 1]))


@pytest.mark.parametrize("causal", ["no", "False", 0, 1, None, torch.tensor(True)],
                         ids=["str-no", "str-False", "int0", "int1", "None", "tensor"])
def test_causal_must_be_a_bool(causal):
    """A non-bool causal (a truthy string such as "no" would silently mean True) is refused with
    the argument's name and the type received; True/False behave as the reference's causal mask."""
    tensors = make(torch.float64, n_keys=3)
    with pytest.raises(TypeError, match=rf"causal must be a bool.*{type(causal).__name__}"):
        prefix_attention(*tensors, causal=causal, backend="reference")
    for flag in (True, False):
        out = prefix_attention(*tensors, causal=flag, backend="reference")
        want, _ = prefix_attention_reference(*tensors, causal=flag)
        torch.testing.assert_close(out, want)
    assert not torch.equal(prefix_attention(*tensors, causal=True, backend="reference"),
                           prefix_attention(*tensors, causal=False, backend="reference"))
