"""Property-based tests: random shapes, dtypes, strides, masks, prefix lengths and prefix_ids.

Every input is either computed correctly (out, lse and -- on some examples -- the gradients of the
five tensor inputs match the fp64 reference by flash-attention's error rule) or refused with a
TypeError/ValueError whose message names the offending argument. Never another exception type,
never NaN where the reference has none.

Hypothesis runs derandomized with no example database, so CI sees the same examples every time.
Backends: "reference", "cpu" (the C++ op; skipped when it cannot be built) and "triton" (the CPU
interpreter without CUDA: slow, so fewer examples and tiny shapes).

Bugs found while writing these have regression tests at the end.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import ATOL, DEVICE, TRITON_RUNNABLE, Case, backend_device, max_err, need
from prefix_kernels import prefix_attention, prefix_attention_reference

BACKENDS = ["reference", "cpu", "triton"]
HEAD_DIMS = [1, 8, 16, 24, 64, 80]
FP = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


# ---------------------------------------------------------------- problem description

class Example(NamedTuple):
    """One drawn example: the problem, its dtype, which of q, k, v, prefix_k, prefix_v require grad
    (empty: no backward) and the seed of its values."""

    case: Case
    dtype: torch.dtype
    grads: tuple[bool, ...]
    seed: int

    def build(self, dev=torch.device("cpu")):
        """(tensors [q, k, v, prefix_k, prefix_v] as leaves with the drawn strides, kwargs, grad_out)."""
        x = self.case.make(self.dtype, dev, self.seed, requires_grad=self.grads or (False,) * 5)
        return list(x.tensors), x.kwargs, x.grad_out


@st.composite
def specs(draw, backend: str) -> Example:
    tiny = backend == "triton"  # the interpreter pays per program and per block iteration
    B = draw(st.integers(0, 2 if tiny else 3))
    Hkv = draw(st.integers(1, 2 if tiny else 3))
    G = draw(st.integers(1, 2 if tiny else 3))
    N = draw(st.integers(0, 5 if tiny else 9))
    causal = draw(st.booleans())
    if causal:
        M = N + draw(st.integers(0, 5 if tiny else 9))
    else:  # without causality fewer keys than queries (even none) is allowed
        M = draw(st.one_of(st.integers(N, N + (5 if tiny else 9)), st.integers(0, N)))
    P = draw(st.integers(0, 9))
    D = draw(st.sampled_from(HEAD_DIMS))
    bank = draw(st.sampled_from(["shared", "bank1", "ids"]))
    T = draw(st.integers(1, 3)) if bank == "ids" else 1
    ids_dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]))
    ids_strided = draw(st.booleans())
    padding = draw(st.sampled_from([None, "random", "dead_rows", "all_padded", "all_visible", "left_any",
                                    "right_any"]))
    mask_layout = draw(st.sampled_from(["contig", "strided", "transposed"]))
    layouts = ["contig", "bshd", "d_strided", "expanded"]
    q_layout, kv_layout = draw(st.sampled_from(layouts)), draw(st.sampled_from(layouts))
    prefix_layout = draw(st.sampled_from(["contig", "p_sliced", "phd"]))
    go_layout = draw(st.sampled_from(["contig", "bshd"]))
    if backend == "triton":
        dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16]))
    else:
        dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    scale = draw(st.sampled_from([None, None, 0.05, 0.5, 1.0, 3.0]))
    grads: tuple[bool, ...] = ()
    if draw(st.integers(0, 2)) > 0:  # two thirds of the examples also check the backward
        grads = tuple(draw(st.lists(st.booleans(), min_size=5, max_size=5)))
        if draw(st.booleans()):
            grads = (True,) * 5
    seed = draw(st.integers(0, 2**31 - 1))
    case = Case(batch=B, heads=Hkv * G, kv_heads=Hkv, n_queries=N, n_keys=M, n_prefix=P, head_dim=D, causal=causal,
                padding=padding, n_prefixes=None if bank == "shared" else T, with_ids=bank == "ids",
                ids_dtype=ids_dtype, ids_strided=ids_strided, q_layout=q_layout, kv_layout=kv_layout,
                prefix_layout=prefix_layout, mask_layout=mask_layout, go_layout=go_layout, scale=scale)
    return Example(case, dtype, grads, seed)


# ---------------------------------------------------------------- the properties

def assert_close_by_rule(name, got, same_dtype, truth, factor, atol):
    """flash-attention's rule, err(op) <= factor * err(same-dtype PyTorch) + atol, with atol taken
    relative to the size of the true values: the drawn scales (up to 3) give logits of ~50 and
    gradients of ~30, and an op that recomputes the probabilities from its fp32 LSE (as
    flash-attention does) then loses ~1e-5 relative, which an absolute atol made for O(1) values
    does not cover."""
    assert not torch.isnan(got).any(), f"{name}: NaN in result"
    err, ref_err = max_err(got, truth), max_err(same_dtype, truth)
    size = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    assert err <= factor * ref_err + atol * size, (
        f"{name}: err {err:.3e} > {factor} * torch err {ref_err:.3e} + {atol:g} * {size:.3g}")


def check_matches_reference(example: Example, backend: str) -> None:
    tensors, kwargs, go = example.build(backend_device(backend))
    q = tensors[0]
    try:
        out, lse = prefix_attention(*tensors, return_lse=True, backend=backend, **kwargs)
    except (TypeError, ValueError) as exc:  # every drawn problem is valid per the docstring
        raise AssertionError(f"valid input refused: {type(exc).__name__}: {exc}") from exc
    assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32, (lse.shape, lse.dtype)

    leaves64 = [t.detach().double().requires_grad_() for t in tensors]
    out64, lse64 = prefix_attention_reference(*leaves64, **kwargs)
    same = [t.detach().clone().requires_grad_() for t in tensors]
    out_same, _ = prefix_attention_reference(*same, upcast=False, **kwargs)
    atol = ATOL[example.dtype]
    assert_close_by_rule("out", out, out_same, out64, 2, atol)
    finite = torch.isfinite(lse64)
    assert not torch.isnan(lse).any(), "lse: NaN"
    assert torch.equal(torch.isfinite(lse), finite), "lse: rows that see no key differ from the reference"
    assert torch.equal(lse[~finite], lse64[~finite].float()), "lse: a row that sees no key must be -inf"
    if finite.any():
        bound = 1e-4 * max(1.0, lse64[finite].abs().max().item())
        assert max_err(lse[finite], lse64[finite]) <= bound, "lse differs from the reference"

    wanted = [i for i, w in enumerate(example.grads) if w]
    if not wanted:
        return
    names = ("dq", "dk", "dv", "dprefix_k", "dprefix_v")
    grads = torch.autograd.grad(out, [tensors[i] for i in wanted], go, allow_unused=True)
    grads64 = torch.autograd.grad(out64, [leaves64[i] for i in wanted], go.double(), allow_unused=True)
    grads_same = torch.autograd.grad(out_same, [same[i] for i in wanted], go, allow_unused=True)
    for i, g, g64, gs in zip(wanted, grads, grads64, grads_same):
        t = tensors[i]
        if g is None:  # allowed only where the reference's gradient is None or all zeros as well
            assert g64 is None or not g64.any(), f"{names[i]}: None but the reference has a gradient"
            continue
        assert g.shape == t.shape and g.dtype == t.dtype, (names[i], g.shape, g.dtype)
        g64 = torch.zeros_like(t, dtype=torch.float64) if g64 is None else g64
        gs = torch.zeros_like(t) if gs is None else gs
        assert_close_by_rule(names[i], g, gs, g64, 3, 2 * atol)


N_EXAMPLES = {"reference": 80, "cpu": 100, "triton": 20}


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_inputs_match_reference(backend):
    need(backend)

    @_settings(N_EXAMPLES[backend])
    @given(spec=specs(backend))
    def run(spec):  # (its source seeds the derandomized examples: keep it as it is)
        check_matches_reference(spec, backend)

    run()


# ---------------------------------------------------------------- invalid inputs

def _other_float(dtype):
    return torch.float64 if dtype != torch.float64 else torch.float32


def _resize(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    return torch.randn(shape).to(t.device, t.dtype)


# Each mutation: (name, applicable(case), apply(args, kwargs, case, draw), error type, message regex).
# The regex names the offending argument.
def _mut_q_ndim(a, kw, s, draw):
    a["q"] = a["q"].flatten(0, 1) if draw(st.booleans()) else a["q"][None]


def _mut_q_dtype(a, kw, s, draw):
    a["q"] = a["q"].to(draw(st.sampled_from([torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8])))


def _mut_not_tensor(name):
    def apply(a, kw, s, draw):
        as_array = a[name].cpu().numpy() if a[name].dtype != torch.bfloat16 else 1.0
        a[name] = draw(st.sampled_from([a[name].tolist(), as_array, None, 3]))
    return apply


def _mut_dtype_mismatch(name):
    def apply(a, kw, s, draw):
        a[name] = a[name].to(_other_float(a["q"].dtype))
    return apply


def _mut_meta_device(name):
    def apply(a, kw, s, draw):
        if name in a:
            a[name] = a[name].to("meta")
        else:
            kw[name] = kw[name].to("meta")
    return apply


def _mut_k_batch(a, kw, s, draw):
    a["k"] = _resize(a["k"], 0, s.B + draw(st.integers(1, 2)))


def _mut_k_dim(a, kw, s, draw):
    a["k"] = _resize(a["k"], 3, s.D + 1)


def _mut_v_shape(a, kw, s, draw):
    dim = draw(st.sampled_from([1, 2]))  # a V head dim of its own (dim 3) is allowed
    a["v"] = _resize(a["v"], dim, a["v"].shape[dim] + 1)


def _mut_heads(a, kw, s, draw):
    a["q"] = _resize(a["q"], 1, s.Hq + draw(st.integers(1, s.Hkv - 1)))


def _mut_hkv_zero(a, kw, s, draw):
    a["k"], a["v"] = _resize(a["k"], 1, 0), _resize(a["v"], 1, 0)


def _mut_causal_short(a, kw, s, draw):
    m = draw(st.integers(0, s.N - 1))
    a["k"], a["v"] = a["k"][:, :, :m], a["v"][:, :, :m]
    kw["causal"] = True
    if kw["key_padding_mask"] is not None:
        kw["key_padding_mask"] = kw["key_padding_mask"][:, :m]


def _mut_head_dim(a, kw, s, draw):
    d = draw(st.sampled_from([0, 257, 300]))
    plain = Case(batch=s.B, heads=s.Hq, kv_heads=s.Hkv, n_queries=s.N, n_keys=s.M, n_prefix=s.P, head_dim=d,
                 n_prefixes=s.T, with_ids=False)
    a.update(plain.make(a["q"].dtype, a["q"].device, requires_grad=False).named())


def _mut_prefix_heads(a, kw, s, draw):
    a["prefix_k"] = _resize(a["prefix_k"], -3, s.Hkv + 1)
    a["prefix_v"] = _resize(a["prefix_v"], -3, s.Hkv + 1)


def _mut_prefix_dim(a, kw, s, draw):
    a["prefix_k"] = _resize(a["prefix_k"], -1, s.D + 1)
    a["prefix_v"] = _resize(a["prefix_v"], -1, s.D + 1)


def _mut_prefix_v_shape(a, kw, s, draw):
    a["prefix_v"] = _resize(a["prefix_v"], -2, s.P + 1)


def _mut_prefix_ndim(a, kw, s, draw):
    pk = a["prefix_k"] if a["prefix_k"].dim() == 3 else a["prefix_k"][0]
    a["prefix_k"] = pk.reshape(-1, s.D) if draw(st.booleans()) else pk[None, None].expand(2, 1, *pk.shape)


def _mut_bank_without_ids(a, kw, s, draw):
    t = draw(st.integers(2, 4))
    a["prefix_k"] = torch.randn(t, s.Hkv, s.P, s.D).to(a["q"].device, a["q"].dtype)
    a["prefix_v"] = torch.randn(t, s.Hkv, s.P, s.D).to(a["q"].device, a["q"].dtype)
    kw["prefix_ids"] = None


def _mut_ids_without_bank(a, kw, s, draw):
    a["prefix_k"], a["prefix_v"] = a["prefix_k"][0], a["prefix_v"][0]


def _mut_ids_dtype(a, kw, s, draw):
    kw["prefix_ids"] = kw["prefix_ids"].to(draw(st.sampled_from([torch.float32, torch.float64, torch.bool,
                                                                 torch.complex64, torch.float16])))


def _mut_ids_not_tensor(a, kw, s, draw):
    kw["prefix_ids"] = draw(st.sampled_from([kw["prefix_ids"].tolist(), 0, (0,) * s.B]))


def _mut_ids_shape(a, kw, s, draw):
    ids = kw["prefix_ids"]
    kw["prefix_ids"] = draw(st.sampled_from([
        torch.zeros(s.B + 1, dtype=ids.dtype, device=ids.device), ids[:, None],
        torch.zeros((), dtype=ids.dtype, device=ids.device),
    ]))


def _mut_ids_range(a, kw, s, draw):
    ids = kw["prefix_ids"].to(torch.int64).clone()
    ids[draw(st.integers(0, s.B - 1))] = draw(st.sampled_from([-1, s.T, s.T + 5, 2**40]))
    kw["prefix_ids"] = ids


def _mut_mask_dtype(a, kw, s, draw):
    kw["key_padding_mask"] = torch.ones(s.B, s.M, device=a["q"].device).to(draw(st.sampled_from(
        [torch.float32, torch.uint8, torch.int64, torch.int32, torch.float16])))


def _mut_mask_shape(a, kw, s, draw):
    kw["key_padding_mask"] = torch.ones(draw(st.sampled_from([
        (s.B, s.M + 1), (s.B + 1, s.M), (s.B, 1, 1, s.M), (s.M,), (s.B, s.N + s.M + 1), (s.B, s.P + s.M + 1),
    ])), dtype=torch.bool, device=a["q"].device)


def _mut_mask_not_tensor(a, kw, s, draw):
    kw["key_padding_mask"] = draw(st.sampled_from([[[True] * s.M] * s.B, 1]))


def _mut_scale(a, kw, s, draw):
    kw["scale"] = draw(st.sampled_from([0.0, -1.0, -1e-3, float("nan"), float("inf"), -float("inf"), True,
                                        "0.5", torch.tensor(0.5), 1e400, [0.5]]))


def _mut_backend(a, kw, s, draw):
    kw["backend"] = draw(st.sampled_from(["cuda", "Triton", "CPU", "", None, "ref"]))


MUTATIONS = [
    ("q ndim", lambda s: True, _mut_q_ndim, ValueError, r"\bq must be 4-D"),
    ("q dtype", lambda s: True, _mut_q_dtype, TypeError, r"\bq must be float16, bfloat16, float32 or float64"),
    *[(f"{n} not a tensor", lambda s: True, _mut_not_tensor(n), TypeError, rf"\b{n} must be a torch\.Tensor")
      for n in ("q", "k", "v", "prefix_k", "prefix_v")],
    *[(f"{n} dtype", lambda s: True, _mut_dtype_mismatch(n), TypeError, rf"\b{n} must have q's dtype")
      for n in ("k", "v", "prefix_k", "prefix_v")],
    *[(f"{n} device", lambda s: True, _mut_meta_device(n), ValueError, rf"\b{n} must be on q's device")
      for n in ("k", "v", "prefix_k", "prefix_v")],
    ("mask device", lambda s: s.padding is not None, _mut_meta_device("key_padding_mask"), ValueError,
     r"key_padding_mask must be on q's device"),
    ("ids device", lambda s: s.has_ids, _mut_meta_device("prefix_ids"), ValueError,
     r"prefix_ids must be on q's device"),
    ("k batch", lambda s: True, _mut_k_batch, ValueError, r"\bk must be \[B="),
    ("k head dim", lambda s: True, _mut_k_dim, ValueError, r"\bk must be \[B="),
    ("v shape", lambda s: True, _mut_v_shape, ValueError, r"\bv must have k's shape"),
    ("head count", lambda s: s.Hkv > 1, _mut_heads, ValueError, r"q's head count Hq=\d+ must be a multiple of k's"),
    ("no kv heads", lambda s: True, _mut_hkv_zero, ValueError, r"k's head count Hkv=0"),
    ("causal M < N", lambda s: s.N > 0, _mut_causal_short, ValueError,
     r"causal attention needs .*k has M=\d+, q has N="),
    ("head dim", lambda s: True, _mut_head_dim, ValueError, r"head dim D must be in 1\.\.256"),
    ("prefix heads", lambda s: True, _mut_prefix_heads, ValueError, r"prefix_k must be \[Hkv="),
    ("prefix head dim", lambda s: True, _mut_prefix_dim, ValueError, r"prefix_k must be \[Hkv="),
    ("prefix_v shape", lambda s: True, _mut_prefix_v_shape, ValueError, r"prefix_v must have prefix_k's shape"),
    ("prefix ndim", lambda s: s.P > 0, _mut_prefix_ndim, ValueError, r"prefix_k must be 3-D or 4-D"),
    ("bank without ids", lambda s: True, _mut_bank_without_ids, ValueError, r"T=\d+ prefixes.*pass prefix_ids"),
    ("ids without bank", lambda s: s.has_ids, _mut_ids_without_bank, ValueError, r"prefix_ids needs a bank"),
    ("ids dtype", lambda s: s.has_ids, _mut_ids_dtype, TypeError, r"prefix_ids must be an integer tensor"),
    ("ids not a tensor", lambda s: s.has_ids, _mut_ids_not_tensor, TypeError,
     r"prefix_ids must be an integer torch\.Tensor"),
    ("ids shape", lambda s: s.has_ids, _mut_ids_shape, ValueError, r"prefix_ids must be \[B="),
    ("ids range", lambda s: s.has_ids and s.B > 0, _mut_ids_range, ValueError, r"prefix_ids must be in \[0, T="),
    ("mask dtype", lambda s: True, _mut_mask_dtype, TypeError, r"key_padding_mask must be bool"),
    ("mask shape", lambda s: True, _mut_mask_shape, ValueError, r"key_padding_mask must be \[B="),
    ("mask not a tensor", lambda s: True, _mut_mask_not_tensor, TypeError,
     r"key_padding_mask must be a bool torch\.Tensor"),
    ("scale", lambda s: True, _mut_scale, ValueError, r"scale must be a positive finite float"),
    ("backend", lambda s: True, _mut_backend, ValueError, r"backend must be one of"),
]


@st.composite
def invalid_calls(draw, backend: str):
    example = draw(specs(backend))
    applicable = [m for m in MUTATIONS if m[1](example.case)]
    name, _, apply, error, pattern = draw(st.sampled_from(applicable))
    tensors, kwargs, _ = example.build(backend_device(backend))
    args = dict(zip(("q", "k", "v", "prefix_k", "prefix_v"), (t.detach() for t in tensors)))
    kwargs = dict(kwargs, backend=backend)
    apply(args, kwargs, example.case, draw)
    return name, args, kwargs, error, pattern


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_inputs_are_refused_naming_the_argument(backend):
    need(backend)

    @_settings(150)
    @given(call=invalid_calls(backend))
    def run(call):
        name, args, kwargs, error, pattern = call
        try:
            prefix_attention(args["q"], args["k"], args["v"], args["prefix_k"], args["prefix_v"], **kwargs)
        except (TypeError, ValueError) as exc:
            assert isinstance(exc, error), f"{name}: {type(exc).__name__} instead of {error.__name__}: {exc}"
            assert re.search(pattern, str(exc)), f"{name}: message does not name the argument: {exc}"
        else:
            raise AssertionError(f"{name}: invalid input accepted")

    run()


# ---------------------------------------------------------------- regressions of bugs found here

def _bank_inputs(B=3, T=3, dev=torch.device("cpu")):
    """q [B, 2, 4, 8], k/v [B, 1, 6, 8], a bank [T, 1, 3, 8]; the caller picks prefix_ids."""
    case = Case(batch=B, heads=2, kv_heads=1, n_queries=4, n_keys=6, n_prefix=3, head_dim=8, n_prefixes=T,
                with_ids=False)
    return list(case.make(torch.float32, dev, requires_grad=False).tensors)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ids_dtype", [torch.uint16, torch.uint32, torch.uint64], ids=str)
def test_unsigned_prefix_ids(backend, ids_dtype):
    """uint16/32/64 prefix_ids (torch has no min/max/argsort for them) are widened to int64."""
    need(backend)
    q, k, v, pk, pv = _bank_inputs(dev=backend_device(backend))
    ids = torch.tensor([2, 0, 1]).to(q.device, ids_dtype)
    out = prefix_attention(q, k, v, pk, pv, prefix_ids=ids, backend=backend)
    want, _ = prefix_attention_reference(q, k, v, pk, pv, prefix_ids=ids.to(torch.int64))
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)


def test_unsigned_prefix_ids_out_of_range_refused():
    """2^64 - 1 as uint64 wraps to -1 in int64: refused as out of range, not wrapped into a row."""
    q, k, v, pk, pv = _bank_inputs()
    ids = torch.tensor([2, 0, -1]).to(torch.uint64)
    with pytest.raises(ValueError, match=r"prefix_ids must be in \[0, T=3\)"):
        prefix_attention(q, k, v, pk, pv, prefix_ids=ids, backend="reference")


@pytest.mark.skipif(not TRITON_RUNNABLE, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_strided_int32_prefix_ids():
    """A non-contiguous int32 prefix_ids (once read as contiguous by the launchers: rows got
    another row's prefix) -- out and the prefix gradients equal the reference's."""
    q, k, v, pk, pv = _bank_inputs(B=2, T=2, dev=DEVICE)
    wide = torch.tensor([0, 0, 1, 0], dtype=torch.int32, device=DEVICE)
    ids = wide[::2]  # [0, 1], stride 2
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out = prefix_attention(*leaves, prefix_ids=ids, backend="triton")
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    want, _ = prefix_attention_reference(*ref_leaves, prefix_ids=ids.contiguous())
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    go = torch.randn_like(want)
    got = torch.autograd.grad(out, leaves, go)
    ref = torch.autograd.grad(want, ref_leaves, go)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
