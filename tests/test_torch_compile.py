"""torch.compile: the op and a prefix-tuned HF model trace into one graph (fullgraph=True, so any
graph break fails) and train with eager's numbers. CPU: the C++ op is a registered custom op with
fake implementations (opcheck in test_cpu.py)."""

from __future__ import annotations

import pytest
import torch

from prefix_kernels import cpu, prefix_attention

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="CUDA: the Triton path is an autograd.Function, not yet a torch.library triton_op"),
    pytest.mark.skipif(not cpu.is_available(), reason="the C++ CPU op is not built"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_op_compiles_fullgraph_with_gradients(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=g).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    k, v = (torch.randn(2, 2, 7, 16, generator=g).requires_grad_() for _ in range(2))
    pk, pv = (torch.randn(3, 2, 3, 16, generator=g).requires_grad_() for _ in range(2))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :2] = False
    ids = torch.tensor([2, 0])

    def fn(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, prefix_ids=ids, backend=backend)

    leaves = (q, k, v, pk, pv)
    want = torch.autograd.grad(fn(*leaves).square().sum(), leaves)
    got = torch.autograd.grad(torch.compile(fn, fullgraph=True)(*leaves).square().sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_prefix_tuned_model_compiles_fullgraph_and_trains():
    pytest.importorskip("transformers")
    from tiny_models import padded_batch, tiny_model

    from prefix_kernels import add_prefix_tuning

    torch._dynamo.reset()
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    choice = torch.tensor([2, 0, 1])
    eager = add_prefix_tuning(tiny_model("llama"), 4, num_prefixes=3).train()
    compiled_model = add_prefix_tuning(tiny_model("llama"), 4, num_prefixes=3).train()
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
    # an out-of-range prefix id inside the compiled graph is an error, not a wrong answer or a crash
    with pytest.raises(RuntimeError, match="prefix_ids must be in"):
        compiled(input_ids=ids, attention_mask=mask, prefix_ids=torch.tensor([3, 0, 1]))
