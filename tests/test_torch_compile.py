"""torch.compile: the op and a prefix-tuned HF model trace into one graph (fullgraph=True, so any
graph break fails) and train with eager's numbers. The C++ CPU op and the Triton path
(``prefix_kernels::triton_fwd`` / ``triton_bwd``, run by the interpreter without CUDA) are
registered custom ops with fake implementations; opcheck here (Triton) and in test_cpu.py (C++)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch._inductor.config

from helpers import DEVICE, Case, backend_device, requires_triton
from prefix_kernels import cpu, prefix_attention

BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not cpu.is_available(), reason="the C++ CPU op is not built")),
    "reference",
    pytest.param("triton", marks=requires_triton),
]
# q in [B, N, H, D] storage (as HF hands it), a bank of three prefixes; the tests pick mask and ids
OP_CASE = Case(batch=2, heads=4, kv_heads=2, n_keys=7, n_prefix=3, head_dim=16, n_prefixes=3, with_ids=False,
               q_layout="bshd")


@pytest.fixture(autouse=True)
def _no_compile_caches():
    """Inductor's on-disk caches key on the graph, not on our fake implementations: a stale entry
    from an older checkout would assert old output strides."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield


def _op_inputs(dev, requires_grad=True, n_queries=5):
    """N = 5 takes the general forward kernel, N = 1 the split-KV decode kernel (Triton)."""
    leaves = replace(OP_CASE, n_queries=n_queries).make(torch.float32, dev, requires_grad=requires_grad).tensors
    mask = torch.ones(2, 7, dtype=torch.bool, device=dev)
    mask[1, :2] = False
    return leaves, mask, torch.tensor([2, 0], device=dev)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_compiles_fullgraph_with_gradients(backend):
    torch._dynamo.reset()
    leaves, mask, ids = _op_inputs(backend_device(backend))

    def fn(q, k, v, pk, pv):
        out, lse = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, prefix_ids=ids, backend=backend,
                                    return_lse=True)
        return out, lse

    out, lse = fn(*leaves)
    want = torch.autograd.grad(out.square().sum(), leaves)
    got_out, got_lse = torch.compile(fn, fullgraph=True)(*leaves)
    got = torch.autograd.grad(got_out.square().sum(), leaves)
    torch.testing.assert_close(got_lse, lse, atol=1e-5, rtol=1e-5)  # natural log on every path
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@requires_triton
@pytest.mark.parametrize("with_mask, n_queries", [(False, 5), (True, 5), (True, 1)])
def test_opcheck_triton_ops(with_mask, n_queries):
    """Schema, fake tensors (strides too), AOT dispatch and the registered autograd of triton_fwd;
    triton_bwd for two output masks (it has no autograd: there is no double backward)."""
    (q, k, v, pk, pv), mask, ids = _op_inputs(DEVICE, n_queries=n_queries)
    mask = mask if with_mask else None
    args = (q, k, v, pk, pv, mask, ids, True, 0.35, False)
    torch.library.opcheck(torch.ops.prefix_kernels.triton_fwd.default, args)
    out, lse = torch.ops.prefix_kernels.triton_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    detached = [t.detach() for t in (q, k, v, pk, pv)]
    for output_mask in ([True] * 5, [False, True, False, True, False]):
        bwd_args = (torch.randn_like(out), *detached, out, lse, mask, ids, True, 0.35, output_mask, False)
        torch.library.opcheck(torch.ops.prefix_kernels.triton_bwd.default, bwd_args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@requires_triton
def test_triton_op_autograd_matches_eager_path():
    """triton_fwd differentiated through its registered autograd == the eager autograd.Function
    (bit-identical: the same launchers), with a shared [Hkv, P, D] prefix."""
    (q, k, v, pk, pv), mask, _ = _op_inputs(DEVICE)
    pk1, pv1 = pk[0].detach().requires_grad_(), pv[0].detach().requires_grad_()
    leaves = (q, k, v, pk1, pv1)
    out, _ = torch.ops.prefix_kernels.triton_fwd(q, k, v, pk1, pv1, mask, None, True, 0.25, True)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, go)
    want_out = prefix_attention(*leaves, key_padding_mask=mask, scale=0.25, deterministic=True, backend="triton")
    want = torch.autograd.grad(want_out, leaves, go)
    assert torch.equal(out, want_out)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if getattr(b, "values", [b])[0] != "reference"])
def test_prefix_tuned_model_compiles_fullgraph_and_trains(backend):
    """The model with the C++ op (CPU) and with the Triton op (the interpreter without CUDA); the
    reference backend is covered at the op level above."""
    pytest.importorskip("transformers")
    from tiny_models import padded_batch, tiny_model

    from prefix_kernels import add_prefix_tuning

    torch._dynamo.reset()
    dev = backend_device(backend)
    ids, mask = (t.to(dev) for t in padded_batch())
    labels = ids.masked_fill(mask == 0, -100)
    choice = torch.tensor([2, 0, 1], device=dev)
    eager = add_prefix_tuning(tiny_model("llama").to(dev), 4, num_prefixes=3, backend=backend).train()
    compiled_model = add_prefix_tuning(tiny_model("llama").to(dev), 4, num_prefixes=3, backend=backend).train()
    with torch.no_grad():
        compiled_model.prefix_embedding.copy_(eager.prefix_embedding)
    compiled = torch.compile(compiled_model, fullgraph=True)

    want = eager(input_ids=ids, attention_mask=mask, labels=labels, prefix_ids=choice).loss
    got = compiled(input_ids=ids, attention_mask=mask, labels=labels, prefix_ids=choice).loss
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_model.prefix_embedding.grad, eager.prefix_embedding.grad,
                               atol=1e-6, rtol=1e-5)
    if dev.type == "cuda":
        return  # a device-side assert would poison the CUDA context of the rest of the session
    # an out-of-range prefix id inside the compiled graph is an error, not a wrong answer or a crash
    with pytest.raises(RuntimeError, match="prefix_ids must be in"):
        compiled(input_ids=ids, attention_mask=mask, prefix_ids=torch.tensor([3, 0, 1], device=dev))
