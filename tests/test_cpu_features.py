"""The C++ CPU op's model-family features against the fp64 reference:
sliding windows (Mistral, Gemma 2, gpt-oss), a value head dim of its own, softcapping (Gemma 2)
and attention sinks (gpt-oss), alone and combined.

The op is called through ``cpu.prefix_attention_cpu`` (the public validation is functional.py's).
Every problem is a ``helpers.Case``; ``helpers.check_against_reference`` checks out, lse and every
gradient (dsinks included) with flash-attention's rule -- err(op) <= 2 x err(same-dtype reference)
+ atol for out (3 x for gradients), both against fp64. The tests below it check what it cannot
say: only the needed gradients, out's layout, saturated logits, thread counts, the raw ops.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from prefix_kernels import cpu
from prefix_kernels.reference import prefix_attention_reference
from helpers import Case, check_against_reference, max_err, need

# the problem most tests vary: GQA 4:2, M > N (a cache), a prefix of 5
BASE = Case(heads=4, kv_heads=2, n_queries=24, n_keys=40, n_prefix=5, head_dim=16)


@pytest.fixture(scope="module", autouse=True)
def ext():
    need("cpu")


def cpu_op(q, k, v, prefix_k, prefix_v, *, scale=None, return_lse=True, **kwargs):
    """(out, lse) of ``cpu.prefix_attention_cpu``, called as check_against_reference calls
    prefix_attention (``return_lse=True``, ``scale`` None: 1/sqrt(D))."""
    assert return_lse, "the C++ op always returns (out, lse)"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return cpu.prefix_attention_cpu(q, k, v, prefix_k, prefix_v, scale=scale, **kwargs)


def check(case: Case, dtype=torch.float32, seed=0, options=None, **features):
    """check_against_reference of the op (with ``options``, a cpu.CPUOptions) on CPU tensors; (out,
    grads of q..prefix_v[, sinks])."""
    fn = cpu_op if options is None else functools.partial(cpu_op, options=options)
    return check_against_reference(fn, case, dtype, seed=seed, device="cpu", **features)


def draw(case: Case, dtype=torch.float32, seed=0, requires_grad=True, sliding_window=None, softcap=None,
         sinks=False):
    """For the checks check_against_reference cannot express: (leaves q..prefix_v[, sinks], kwargs,
    grad_out) of ``case`` on the CPU. The sinks are the ones check_against_reference draws;
    ``requires_grad``: one flag, or one per leaf; kwargs: everything else the op takes."""
    flags = (requires_grad,) * 6 if isinstance(requires_grad, bool) else requires_grad
    inputs = case.make(dtype, "cpu", seed, flags[:5])
    leaves = list(inputs.tensors)
    if sinks:
        leaves.append(case.make_sinks(dtype, "cpu", seed).requires_grad_(flags[5]))
    return leaves, dict(inputs.kwargs, sliding_window=sliding_window, softcap=softcap), inputs.grad_out


def call(fn, leaves, kwargs):
    """fn (cpu_op or prefix_attention_reference) on draw's leaves and kwargs: (out, lse)."""
    return fn(*leaves[:5], sinks=leaves[5] if len(leaves) > 5 else None, **kwargs)


def fp64_leaves(leaves):
    return [t.detach().double().requires_grad_() for t in leaves]


# ---------------------------------------------------------------- 1. sliding window

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
@pytest.mark.parametrize("window", [1, 7, 40, 100], ids=lambda w: f"W={w}")  # M = 40: shorter, equal, longer
def test_sliding_window(window, causal):
    check(replace(BASE, causal=causal, padding="left"), sliding_window=window)


LARGE = {
    # several query blocks and key tiles (BK = 128): tiles before every window are skipped
    "blocks": (Case(batch=2, heads=6, kv_heads=2, n_queries=300, n_keys=420, n_prefix=130, head_dim=32,
                    padding="left", n_prefixes=2, strided=True), 100),
    "blocks non-causal": (Case(batch=1, heads=2, kv_heads=1, n_queries=260, n_keys=300, n_prefix=3, head_dim=24,
                               causal=False), 90),
    # decode: one query (few-row tiles, BK = 512) against a long cache, the window well inside it
    "decode": (Case(batch=3, heads=8, kv_heads=2, n_queries=1, n_keys=1500, n_prefix=20, head_dim=64,
                    padding="left"), 300),
    "decode W=1": (Case(batch=2, heads=4, kv_heads=1, n_queries=1, n_keys=700, n_prefix=0, head_dim=32), 1),
}


@pytest.mark.parametrize("name", list(LARGE))
def test_sliding_window_large(name):
    case, window = LARGE[name]
    check(case, sliding_window=window)


def test_window_hides_everything_but_the_prefix():
    """Non-causal with M < N: early queries' windows end before key 0; they see only the prefix
    (P > 0) or nothing (P = 0: out = 0, lse = -inf, zero gradients)."""
    case = replace(BASE, n_queries=20, n_keys=6, causal=False)
    check(case, sliding_window=3)
    empty = replace(case, n_prefix=0)
    out, grads = check(empty, sliding_window=3)
    _, lse = call(cpu_op, *draw(empty, sliding_window=3)[:2])
    assert torch.isinf(lse[:, :, :12]).all() and torch.isfinite(lse[:, :, 12:]).all()
    assert (out[:, :, :12] == 0).all() and (grads[0][:, :, :12] == 0).all()


def test_window_and_sinks_at_huge_logits():
    """Logits ~1e5 with a window and sinks: the softmax saturates to the argmax; out and lse match the
    reference, gradients stay finite, within the few-percent limit of an fp32 lse at |lse| ~ 1e5
    (as test_edge_inputs.py's huge-logit tests of the plain op)."""
    leaves, kwargs, grad = draw(replace(BASE, q_scale=1e4, n_queries=9, n_keys=12), sliding_window=5, sinks=True)
    out, lse = call(cpu_op, leaves, kwargs)
    grads = torch.autograd.grad(out, leaves, grad)
    leaves64 = fp64_leaves(leaves)
    out64, lse64 = call(prefix_attention_reference, leaves64, kwargs)
    grads64 = torch.autograd.grad(out64, leaves64, grad.double())
    assert max_err(out, out64) <= 1e-5 and max_err(lse, lse64) <= 1e-6 * lse64.abs().max().item()
    size = max(g.abs().max().item() for g in grads64)
    for name, g, g64 in zip(("q", "k", "v", "prefix_k", "prefix_v", "sinks"), grads, grads64):
        assert torch.isfinite(g).all() and max_err(g, g64) <= 0.06 * size, name


# ---------------------------------------------------------------- 2. value head dim

@pytest.mark.parametrize("d, dv", [(16, 24), (40, 8), (64, 128), (8, 1)], ids=lambda x: str(x))
def test_value_head_dim(d, dv):
    check(replace(BASE, head_dim=d, head_dim_v=dv, n_prefixes=3, batch=4, padding="left", strided=True))


def test_value_head_dim_decode_and_blocks():
    check(Case(batch=2, heads=8, kv_heads=2, n_queries=1, n_keys=900, n_prefix=140, head_dim=64, head_dim_v=32,
               padding="left"))
    check(Case(batch=1, heads=4, kv_heads=2, n_queries=150, n_keys=200, n_prefix=130, head_dim=24, head_dim_v=40,
               n_prefixes=2))


def test_value_head_dim_out_layout_follows_q():
    out, _ = call(cpu_op, *draw(replace(BASE, head_dim_v=24, strided=True))[:2])
    assert out.shape[-1] == 24 and out.transpose(1, 2).is_contiguous()


# ---------------------------------------------------------------- 3. softcap

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
@pytest.mark.parametrize("softcap", [0.7, 5.0, 1e4], ids=lambda c: f"c={c:g}")
def test_softcap(softcap, causal):
    check(replace(BASE, causal=causal, q_scale=4.0, padding="left", n_prefixes=2), softcap=softcap)


def test_softcap_bounds_huge_logits():
    """Capped scores stay in [-c, c]: logits ~1e6 give the same result as the reference, no NaN."""
    check(replace(BASE, q_scale=1e5, n_queries=9, n_keys=12), softcap=30.0)


# ---------------------------------------------------------------- 4. sinks

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_sinks(causal):
    check(replace(BASE, causal=causal, padding="left", n_prefixes=2), sinks=True)


def test_sinks_rows_that_see_nothing():
    """No prefix and every key padded: out = 0, lse = the sink (finite), zero gradients but the sink's."""
    case = replace(BASE, n_prefix=0, padding="dead_rows", n_queries=6, n_keys=9)
    out, grads = check(case, sinks=True)
    leaves, kwargs, _ = draw(case, sinks=True)
    dead = ~kwargs["key_padding_mask"].any(1)
    assert dead.any() and not dead.all(), "the draw should hold dead and live rows"
    _, lse = call(cpu_op, leaves, kwargs)
    assert (out[dead] == 0).all()
    torch.testing.assert_close(lse[dead], leaves[5].detach()[None, :, None].expand(int(dead.sum()), -1, 6),
                               rtol=0, atol=1e-6)
    assert (grads[0][dead] == 0).all() and (grads[1][dead] == 0).all()


def test_sinks_gradcheck_float64():
    case = Case(batch=2, heads=4, kv_heads=2, n_queries=5, n_keys=7, n_prefix=3, head_dim=8, head_dim_v=6,
                padding="left", n_prefixes=2)
    leaves, kwargs, _ = draw(case, torch.float64, sliding_window=3, softcap=2.0, sinks=True)
    assert torch.autograd.gradcheck(lambda *t: call(cpu_op, t, kwargs)[0], leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_sinks_fp32_with_bf16_inputs():
    leaves, kwargs, grad = draw(BASE, torch.bfloat16, sliding_window=9)
    sinks32 = BASE.make_sinks(torch.float32, "cpu").requires_grad_()
    out, _ = call(cpu_op, [*leaves, sinks32], kwargs)
    (dsinks,) = torch.autograd.grad(out, sinks32, grad)
    out64, _ = call(prefix_attention_reference, fp64_leaves([*leaves, sinks32]), kwargs)
    assert dsinks.dtype == torch.float32 and max_err(out, out64) < 2e-2


# ---------------------------------------------------------------- combined, as model families use them

FAMILIES = {
    # gpt-oss: sliding-window layers with sinks, GQA 8:2
    "gpt-oss": (replace(BASE, heads=8, n_queries=40, n_keys=70, padding="left", n_prefixes=2),
                dict(sliding_window=16, sinks=True)),
    "gpt-oss decode": (replace(BASE, heads=8, n_queries=1, n_keys=600), dict(sliding_window=128, sinks=True)),
    # Gemma 2: sliding window + softcap 50 (scores well inside the cap unless q is large)
    "gemma2": (replace(BASE, n_queries=33, n_keys=50, q_scale=8.0, padding="left"),
               dict(sliding_window=12, softcap=50.0)),
    "everything": (Case(batch=3, heads=6, kv_heads=3, n_queries=30, n_keys=45, n_prefix=5, head_dim=24,
                        head_dim_v=12, n_prefixes=3, padding="dead_rows", strided=True, q_scale=3.0, causal=False),
                   dict(sliding_window=10, softcap=3.0, sinks=True)),
}


def check_family(name, dtype=torch.float32, options=None, **changes):
    case, features = FAMILIES[name]
    return check(replace(case, **changes), dtype, options=options, **features)


def draw_family(name, requires_grad=True, **changes):
    case, features = FAMILIES[name]
    return draw(replace(case, **changes), requires_grad=requires_grad, **features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_families(family, dtype):
    check_family(family, dtype)


def test_portable_kernels():
    """The non-AVX2 build of the kernels (CPUOptions(isa="base"), picked per call)."""
    options = cpu.CPUOptions(isa="base")
    assert "isa=base" in cpu.build_info(options)
    check_family("everything", options=options)
    check_family("gpt-oss decode", options=options)


def test_aten_gemm_path():
    """With CPUOptions(gemm="aten") tile products go through ATen (picked per call)."""
    options = cpu.CPUOptions(gemm="aten")
    assert "gemm=aten" in cpu.build_info(options), cpu.build_info(options)
    check_family("everything", options=options)
    check_family("gemma2", torch.float64, options=options)


def test_bit_identical_across_thread_counts():
    leaves, kwargs, grad = draw_family("everything", n_queries=150, n_keys=200)
    kwargs["sliding_window"] = 60
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, lse = call(cpu_op, leaves, kwargs)
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
    """Asked for some gradients, the op gives exactly those of the full backward, which is checked
    against the reference."""
    check_family("everything", causal=True)
    leaves, kwargs, grad = draw_family("everything", causal=True)
    out, _ = call(cpu_op, leaves, kwargs)
    full = torch.autograd.grad(out, leaves, grad)
    leaves, kwargs, _ = draw_family("everything", requires_grad=flags, causal=True)
    out, _ = call(cpu_op, leaves, kwargs)
    part = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad)
    wanted = [g for g, flag in zip(full, flags) if flag]
    assert len(part) == len(wanted) and all(torch.equal(g, w) for g, w in zip(part, wanted))


def op_args(**changes):
    """The raw ops' arguments for "everything": (q..prefix_v, sinks) not requiring grad, (mask, ids,
    causal, scale), (window, softcap), grad_out."""
    leaves, kwargs, grad = draw_family("everything", requires_grad=False, **changes)
    fixed = (kwargs["key_padding_mask"], kwargs["prefix_ids"], kwargs["causal"], leaves[0].shape[-1] ** -0.5)
    return leaves, fixed, (kwargs["sliding_window"], kwargs["softcap"]), grad


def test_backward_op_skips_unneeded_grads():
    (q, k, v, pk, pv, sinks), fixed, (window, cap), grad = op_args()
    features = (window, cap, sinks)
    out, lse = torch.ops.prefix_kernels.fwd_cpu(q, k, v, pk, pv, *fixed, *features)
    bwd = torch.ops.prefix_kernels.bwd_cpu
    full = bwd(grad, q, k, v, pk, pv, out, lse, *fixed, [True] * 6, *features)
    part = bwd(grad, q, k, v, pk, pv, out, lse, *fixed, [False, True, False, False, True, True], *features)
    assert [g.numel() > 0 for g in part] == [False, True, False, False, True, True]
    for i in (1, 4, 5):
        assert torch.equal(part[i], full[i])
    assert len(bwd(grad, q, k, v, pk, pv, out, lse, *fixed, [True] * 5, *features)) == 5


# ---------------------------------------------------------------- op checks

SMALL = dict(n_queries=5, n_keys=7, heads=4, kv_heads=2, head_dim=8, head_dim_v=4)


def test_opcheck_fwd():
    (q, k, v, pk, pv, sinks), fixed, (window, cap), _ = op_args(**SMALL)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv, sinks)]
    torch.library.opcheck(torch.ops.prefix_kernels.fwd_cpu.default, (*leaves[:5], *fixed, window, cap, leaves[5]))
    torch.library.opcheck(torch.ops.prefix_kernels.fwd_cpu.default, (*leaves[:5], *fixed, window, None, None))


def test_opcheck_bwd():
    (q, k, v, pk, pv, sinks), fixed, (window, cap), grad = op_args(**SMALL)
    out, lse = torch.ops.prefix_kernels.fwd_cpu(q, k, v, pk, pv, *fixed, window, cap, sinks)
    for output_mask in ([True] * 6, [False, True, False, True, False, True]):
        args = (grad, q, k, v, pk, pv, out, lse, *fixed, output_mask, window, cap, sinks)
        torch.library.opcheck(torch.ops.prefix_kernels.bwd_cpu.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_registered_autograd_of_the_op():
    """fwd_cpu is differentiable on its own (register_autograd), sinks included, like prefix_attention_cpu."""
    tensors, fixed, (window, cap), grad = op_args(**SMALL)
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
    leaves, kwargs, grad = draw_family("everything", strided=False)

    def fn(*leaves):
        out, lse = call(cpu_op, leaves, kwargs)
        return out * 2, lse

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        out, lse = f(*leaves)
        results.append((out, lse, *torch.autograd.grad(out, leaves, grad)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_op_checks_name_the_argument():
    (q, k, v, pk, pv, sinks), fixed, _, _ = op_args(**SMALL)
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
