"""The op's optional features -- sliding windows, logit softcapping, attention sinks, a V head dim
of its own -- against the
fp64 reference (flash-attention's tolerance rule), alone and combined, through the public
``prefix_attention`` on every backend that runs here (Triton under the interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from helpers import DEVICE, ON_GPU, Case, backend_device, check_against_reference, max_err, need
from prefix_kernels import prefix_attention, prefix_attention_reference

BACKENDS = ["triton", "cpu", "reference"]

# (case, features): windows shorter than, equal to and longer than M; causal and not; a cache (M > N);
# decode (N = 1, N = 3) over a long cache; gpt-oss (window + sinks) and Gemma 2 (window + softcap).
CASES = {
    "window_short": (Case(batch=2, heads=4, kv_heads=2, n_queries=45, n_keys=77, n_prefix=7, padding="left"),
                     dict(sliding_window=5)),
    "window_one": (Case(batch=2, heads=2, kv_heads=1, n_queries=33, n_keys=33, n_prefix=3), dict(sliding_window=1)),
    "window_eq_M": (Case(batch=2, heads=2, kv_heads=2, n_queries=40, n_keys=40, n_prefix=4, n_prefixes=2),
                    dict(sliding_window=40)),
    "window_long": (Case(batch=2, heads=4, kv_heads=2, n_queries=45, n_keys=77, n_prefix=7), dict(sliding_window=200)),
    "window_blocks": (Case(batch=1, heads=2, kv_heads=1, n_queries=150, n_keys=150, n_prefix=3),
                      dict(sliding_window=20)),
    "window_noncausal": (Case(batch=2, heads=4, kv_heads=2, n_queries=45, n_keys=77, n_prefix=7, causal=False,
                              padding="right"), dict(sliding_window=9)),
    "decode_window": (Case(batch=2, heads=4, kv_heads=2, n_queries=1, n_keys=300, n_prefix=5),
                      dict(sliding_window=30)),
    "decode3_window_sinks": (Case(batch=2, heads=4, kv_heads=2, n_queries=3, n_keys=300, n_prefix=5,
                                  padding="left"), dict(sliding_window=30, sinks=True)),
    "softcap": (Case(batch=2, heads=4, kv_heads=2, n_queries=45, n_keys=77, n_prefix=7), dict(softcap=2.0)),
    "sinks": (Case(batch=2, heads=4, kv_heads=2, n_queries=45, n_keys=77, n_prefix=7, padding="left"),
              dict(sinks=True)),
    "sinks_no_prefix_dead_rows": (Case(batch=3, heads=2, kv_heads=1, n_queries=20, n_keys=30, n_prefix=0,
                                       padding="dead_rows"), dict(sinks=True)),
    "gpt_oss": (Case(batch=2, heads=4, kv_heads=2, n_queries=45, n_keys=77, n_prefix=7, n_prefixes=3,
                     padding="left"), dict(sliding_window=12, sinks=True)),
    "gemma2": (Case(batch=2, heads=4, kv_heads=2, n_queries=45, n_keys=77, n_prefix=7, padding="right"),
               dict(sliding_window=10, softcap=3.0)),
    "all": (Case(batch=2, heads=2, kv_heads=1, n_queries=64, n_keys=100, n_prefix=9, n_prefixes=2),
            dict(sliding_window=16, softcap=4.0, sinks=True)),
    # a V head dim of its own (MLA: Q/K 192, V 128), with a bank, padding, a cache and decode
    "dv_smaller": (Case(batch=2, heads=4, kv_heads=2, n_queries=45, n_keys=77, n_prefix=7, head_dim=48,
                        head_dim_v=32, n_prefixes=2, padding="left"), {}),
    "dv_larger_strided": (Case(batch=2, heads=2, kv_heads=1, n_queries=30, n_keys=30, n_prefix=5, head_dim=16,
                               head_dim_v=40, strided=True), dict(sliding_window=8, sinks=True)),
    "dv_decode": (Case(batch=2, heads=4, kv_heads=2, n_queries=1, n_keys=120, n_prefix=5, head_dim=32,
                       head_dim_v=24, padding="left"), dict(softcap=2.0)),
}


def _op(backend, **extra):
    def op(*args, **kwargs):
        return prefix_attention(*args, backend=backend, **extra, **kwargs)
    return op


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_features_against_reference(backend, name):
    need(backend)
    case, features = CASES[name]
    if backend == "triton":
        case = case.on_device()
    check_against_reference(_op(backend), case, torch.float32, device=backend_device(backend), **features)


@pytest.mark.parametrize("name", ["gpt_oss", "gemma2", "decode3_window_sinks"])
def test_features_half_precision(name):
    need("triton")
    case, features = CASES[name]
    check_against_reference(_op("triton"), case.on_device(), torch.bfloat16 if ON_GPU else torch.float16,
                            **features)


@pytest.mark.parametrize("name", ["gpt_oss", "all"])
def test_features_deterministic_bit_identical(name):
    need("triton")
    case, features = CASES[name]
    q, k, v, pk, pv, mask, ids = case.on_device().make(torch.float32)
    sinks = torch.randn(q.shape[1], device=q.device).requires_grad_() if features.get("sinks") else None
    kwargs = dict(features, sinks=sinks, key_padding_mask=mask, prefix_ids=ids)
    leaves = [t for t in (q, k, v, pk, pv, sinks) if t is not None]
    grad = torch.randn(q.shape, device=q.device)
    runs = []
    for _ in range(2):
        out = prefix_attention(q, k, v, pk, pv, backend="triton", deterministic=True, **kwargs)
        runs.append(torch.autograd.grad(out, leaves, grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sink_gradient_gradcheck(backend):
    """fp64 gradcheck of every input including the sinks (fast mode under the interpreter)."""
    need(backend)
    device = backend_device(backend)
    case = Case(batch=2, heads=2, kv_heads=1, n_queries=3, n_keys=6, n_prefix=2, head_dim=16, padding="left")
    q, k, v, pk, pv, mask, _ = case.make(torch.float64, device)
    sinks = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)

    def f(*t):
        return prefix_attention(*t[:5], sinks=t[5], sliding_window=3, softcap=2.5, key_padding_mask=mask,
                                backend=backend)

    torch.autograd.gradcheck(f, (q, k, v, pk, pv, sinks), fast_mode=backend == "triton" and not ON_GPU)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_queries", [1, 40])
def test_window_never_reads_keys_outside_every_window(backend, n_queries):
    """With a cache, keys before the first query's window are seen by no query: they are not read at
    all (NaN there stays out of out and every gradient), which is what makes the cost follow W."""
    need(backend)
    if backend == "reference":
        pytest.skip("the reference computes every score (0 * NaN = NaN): it is not meant to skip work")
    case = Case(batch=2, heads=2, kv_heads=1, n_queries=n_queries, n_keys=400, n_prefix=4)
    q, k, v, pk, pv, _, _ = case.make(torch.float32, backend_device(backend))
    window = 16
    first_seen = 400 - n_queries - window + 1  # the lowest key any query's window reaches
    unseen = first_seen // 128 * 128  # whole key blocks below it (blocks are read whole, masked inside)
    k_nan, v_nan = k.detach().clone(), v.detach().clone()
    k_nan[:, :, :unseen] = float("nan")
    v_nan[:, :, :unseen] = float("nan")
    k_nan.requires_grad_(), v_nan.requires_grad_()
    out = prefix_attention(q, k_nan, v_nan, pk, pv, sliding_window=window, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (q, k_nan, v_nan, pk, pv))
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g[:, :, unseen:] if i in (1, 2) else g).all() for i, g in enumerate(grads))
    want, _ = prefix_attention_reference(q, k, v, pk, pv, sliding_window=window)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sliding_window=0), ValueError, "sliding_window must be >= 1"),
    (dict(sliding_window=-3), ValueError, "sliding_window must be >= 1"),
    (dict(sliding_window=2.0), TypeError, "sliding_window must be an int"),
    (dict(sliding_window=True), TypeError, "sliding_window must be an int"),
    (dict(softcap=0.0), ValueError, "softcap must be a positive finite float"),
    (dict(softcap=-1.0), ValueError, "softcap must be a positive finite float"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a positive finite float"),
    (dict(softcap=float("nan")), ValueError, "softcap must be a positive finite float"),
    (dict(softcap="2"), TypeError, "softcap must be a positive finite float"),
    (dict(sinks=[0.0, 0.0]), TypeError, "sinks must be a torch.Tensor"),
    (dict(sinks=torch.zeros(3)), ValueError, r"sinks must be \[Hq=2\]"),
    (dict(sinks=torch.zeros(2, 1)), ValueError, r"sinks must be \[Hq=2\]"),
    (dict(sinks=torch.zeros(2, dtype=torch.float64)), TypeError, "sinks must have q's dtype"),
    (dict(sinks=torch.zeros(2, device="meta")), ValueError, "sinks must be on q's device"),
    (dict(v=torch.zeros(2, 1, 16, 300)), ValueError, r"v's head dim Dv must be in 1\.\.256"),
    (dict(prefix_v=torch.zeros(1, 4, 24)), ValueError, r"prefix_v must have prefix_k's shape \(1, 4\) with v's head dim Dv=32"),
])
def test_bad_feature_arguments_are_refused(kwargs, error, match):
    q, k, v, pk, pv, _, _ = Case(heads=2, kv_heads=1).make(torch.float32, "cpu")
    tensors = dict(v=v, prefix_v=pv)
    tensors.update((name, kwargs.pop(name)) for name in list(kwargs) if name in tensors)
    with pytest.raises(error, match=match):
        prefix_attention(q, k, tensors["v"], pk, tensors["prefix_v"], backend="reference", **kwargs)


def test_registered_ops_with_features_pass_opcheck():
    """triton_fwd/triton_bwd with a window, a softcap and differentiable sinks: schema, fake impls,
    autograd registration (torch.library.opcheck)."""
    need("triton")
    from prefix_kernels import autograd  # noqa: F401 -- registers the ops

    case = Case(batch=2, heads=2, kv_heads=1, n_queries=20, n_keys=30, n_prefix=4, padding="left").on_device()
    q, k, v, pk, pv, mask, _ = case.make(torch.float32)
    sinks = torch.randn(2, device=q.device, requires_grad=True)
    args = (q, k, v, pk, pv, mask, None, True, 0.25, False, 8, 3.0, sinks)
    torch.library.opcheck(torch.ops.prefix_kernels.triton_fwd, args)
    assert DEVICE.type in ("cpu", "cuda")


def _sink_view(layout: str, n_heads: int, dtype: torch.dtype, device="cpu", seed: int = 3):
    """(leaf, sinks): an [Hq] view with strides of its own over a leaf that requires grad --
    every other element of a longer vector, or one value expanded (stride 0)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "strided":
        leaf = torch.randn(2 * n_heads, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        leaf.requires_grad_()
        return leaf, leaf[::2]
    leaf = torch.tensor(0.7, dtype=dtype, device=device, requires_grad=True)
    return leaf, leaf.expand(n_heads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_queries", [1, 6], ids=["decode", "prefill"])
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_sinks_views_with_their_own_strides(backend, n_queries, layout):
    """Sinks given as a strided or expanded view: out and the sink gradient (which reaches the view's
    leaf through the view's own backward) match the fp64 reference. The Triton path is checked
    through the public op and through its autograd Function directly (no copy on the way)."""
    need(backend)
    device = backend_device(backend)
    case = Case(batch=2, heads=4, kv_heads=2, n_queries=n_queries, n_keys=7, n_prefix=3, head_dim=16,
                padding="left")
    q, k, v, pk, pv, mask, _ = case.make(torch.float32, device)
    q64, k64, v64, pk64, pv64 = (t.detach().double() for t in (q, k, v, pk, pv))
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(device)
    leaf64, sinks64 = _sink_view(layout, 4, torch.float64)
    want, _ = prefix_attention_reference(q64, k64, v64, pk64, pv64, key_padding_mask=mask, sinks=sinks64)
    (want * grad.double()).sum().backward()

    entries = [lambda s: prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, sinks=s, backend=backend)]
    if backend == "triton":
        from prefix_kernels.autograd import PrefixAttentionFunction

        entries.append(lambda s: PrefixAttentionFunction.apply(
            q, k, v, pk, pv, mask, None, True, 0.25, False, None, None, s)[0])
    for entry in entries:
        leaf, sinks = _sink_view(layout, 4, torch.float32, device)
        out = entry(sinks)
        (out * grad).sum().backward()
        assert max_err(out.cpu(), want) < 1e-5
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape
        assert max_err(leaf.grad.cpu(), leaf64.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_queries", [1, 6], ids=["decode", "prefill"])
def test_huge_and_infinite_sinks(backend, n_queries):
    """A sink of +inf or near fp32's max takes the whole softmax: out = 0 for its head with a finite
    lse and finite gradients (zero for that head), as the reference computes for a sink that is merely
    very large; the other heads are unaffected. A -inf sink on a row with every key hidden and no
    prefix: out = 0, lse = -inf, zero gradients, no NaN."""
    need(backend)
    device = backend_device(backend)
    case = Case(batch=2, heads=4, kv_heads=2, n_queries=n_queries, n_keys=7, n_prefix=3, head_dim=16)
    q, k, v, pk, pv, _, _ = case.make(torch.float32, device)
    leaves = (q, k, v, pk, pv)
    q64, k64, v64, pk64, pv64 = (t.detach().double().requires_grad_() for t in leaves)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(device)
    big = 1e4  # exp(-1e4) = 0: the reference's out and gradients for this head are those of any larger sink
    for value in (float("inf"), 3e38, torch.finfo(torch.float32).max):
        sinks = torch.tensor([value, 0.5, -1.0, value], device=device).requires_grad_()
        out, lse = prefix_attention(q, k, v, pk, pv, sinks=sinks, return_lse=True, backend=backend)
        grads = torch.autograd.grad(out, (*leaves, sinks), grad)
        s64 = torch.tensor([big, 0.5, -1.0, big], dtype=torch.float64, requires_grad=True)
        want, want_lse = prefix_attention_reference(q64, k64, v64, pk64, pv64, sinks=s64)
        wants = torch.autograd.grad(want, (q64, k64, v64, pk64, pv64, s64), grad.double())
        assert torch.isfinite(lse).all() and (lse[:, [0, 3]] > 1e30).all()
        torch.testing.assert_close(lse[:, 1:3].cpu(), want_lse[:, 1:3].float(), rtol=1e-5, atol=1e-5)
        assert max_err(out.cpu(), want) < 1e-5
        for g, w in zip(grads, wants):
            assert torch.isfinite(g).all()
            assert max_err(g.cpu(), w) < 1e-5

    # -inf sinks; every key hidden, no prefix
    pk0, pv0 = pk[:, :0].detach().requires_grad_(), pv[:, :0].detach().requires_grad_()
    mask = torch.zeros(2, 7, dtype=torch.bool, device=device)
    sinks = torch.tensor([float("-inf"), 0.5, float("-inf"), -1.0], device=device).requires_grad_()
    out, lse = prefix_attention(q, k, v, pk0, pv0, sinks=sinks, key_padding_mask=mask, return_lse=True,
                                backend=backend)
    grads = torch.autograd.grad(out, (q, k, v, sinks), grad)
    assert torch.equal(out, torch.zeros_like(out))
    assert (lse[:, [0, 2]] == float("-inf")).all()
    torch.testing.assert_close(lse[:, [1, 3]].cpu(), torch.tensor([0.5, -1.0])[None, :, None].expand(2, 2, n_queries))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("n_queries", [1, 6], ids=["decode", "prefill"])
@pytest.mark.parametrize("cap", [50.0, 1e3, 1e4, 1e6, 1e8])
def test_softcap_precision_for_any_cap(backend, n_queries, cap):
    """softcap c * tanh(s / c) with c much larger than the scores: out and every gradient stay at
    fp32's roundoff (~1e-6 relative) of the fp64 reference, as without a softcap -- tanh must not
    lose digits for small arguments (the loss grows with c)."""
    need(backend)
    device = backend_device(backend)
    case = Case(batch=1, heads=2, kv_heads=1, n_queries=n_queries, n_keys=9, n_prefix=3, head_dim=16)
    q, k, v, pk, pv, _, _ = case.make(torch.float64, "cpu")
    leaves64 = [(t.detach() * 2).requires_grad_() for t in (q, k, v, pk, pv)]  # scores of a few units
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want, _ = prefix_attention_reference(*leaves64, softcap=cap)
    wants = torch.autograd.grad(want, leaves64, grad)
    leaves = [t.detach().float().to(device).requires_grad_() for t in leaves64]
    out = prefix_attention(*leaves, softcap=cap, backend=backend)
    grads = torch.autograd.grad(out, leaves, grad.float().to(device))
    for got, truth in zip((out, *grads), (want, *wants)):
        assert max_err(got.cpu(), truth) <= 5e-6 * max(1.0, truth.abs().max().item())


@pytest.mark.parametrize("cap", [1e3, 1e8])
def test_softcap_precision_fp64_triton(cap):
    """The same in fp64 (the Triton kernels compute fp64 inputs in fp64): out to ~1e-15, not c * 1e-16.
    (The fp64 backward reads an fp32 lse, which limits its gradients to ~1e-7 with or without a softcap.)"""
    need("triton")
    case = Case(batch=1, heads=2, kv_heads=1, n_queries=6, n_keys=9, n_prefix=3, head_dim=16).on_device()
    q, k, v, pk, pv, _, _ = case.make(torch.float64)
    tensors = [t.detach() * 2 for t in (q, k, v, pk, pv)]
    want, _ = prefix_attention_reference(*tensors, softcap=cap)
    out = prefix_attention(*tensors, softcap=cap, backend="triton")
    assert max_err(out, want) <= 1e-13
