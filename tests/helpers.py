"""Shared test helpers: device choice, input builders, and the flash-attention tolerance rule."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import pytest
import torch

from prefix_kernels.reference import prefix_attention_reference

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TRITON_RUNNABLE = ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"
requires_triton = pytest.mark.skipif(not TRITON_RUNNABLE, reason="needs CUDA or TRITON_INTERPRET=1")
requires_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


@dataclass(frozen=True)
class Case:
    """One attention problem. On a GPU the sizes are scaled up by ``gpu_scale``."""

    batch: int = 2
    heads: int = 2
    kv_heads: int = 2
    n_queries: int = 16
    n_keys: int = 16
    n_prefix: int = 4
    head_dim: int = 32
    causal: bool = True
    padding: str | None = None  # None, "left", "right"
    n_prefixes: int | None = None  # a bank of T prefixes with prefix_ids
    strided: bool = False  # [B, S, H, D] storage viewed as [B, H, S, D], prefix sliced
    gpu_scale: int = 8

    def on_device(self) -> "Case":
        if not ON_GPU:
            return self
        s = self.gpu_scale
        return replace(self, n_queries=max(1, self.n_queries * s) if self.n_queries > 1 else 1,
                       n_keys=self.n_keys * s, n_prefix=self.n_prefix * (s // 2 if self.n_prefix > 1 else 1),
                       batch=self.batch * 2)


def _seq(shape_bhsd, dtype, strided, gen):
    b, h, s, d = shape_bhsd
    if strided:
        return torch.randn(b, s, h, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    return torch.randn(b, h, s, d, generator=gen).to(DEVICE, dtype)


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0):
    """(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids), all leaf tensors requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    c = case
    q = _seq((c.batch, c.heads, c.n_queries, c.head_dim), dtype, c.strided, gen)
    k = _seq((c.batch, c.kv_heads, c.n_keys, c.head_dim), dtype, c.strided, gen)
    v = _seq((c.batch, c.kv_heads, c.n_keys, c.head_dim), dtype, c.strided, gen)
    bank = (c.n_prefixes,) if c.n_prefixes else ()
    extra = 3 if c.strided else 0  # slice a longer prefix: non-contiguous along P
    pk = torch.randn(*bank, c.kv_heads, c.n_prefix + extra, c.head_dim, generator=gen).to(DEVICE, dtype)
    pv = torch.randn(*bank, c.kv_heads, c.n_prefix + extra, c.head_dim, generator=gen).to(DEVICE, dtype)
    pk, pv = pk[..., extra:, :], pv[..., extra:, :]
    mask = None
    if c.padding:
        lengths = torch.randint(1, c.n_keys + 1, (c.batch,), generator=gen)
        lengths[0] = max(1, c.n_keys // 3)  # at least one row well padded
        pos = torch.arange(c.n_keys)
        if c.padding == "left":
            mask = pos[None, :] >= (c.n_keys - lengths)[:, None]
        else:
            mask = pos[None, :] < lengths[:, None]
        mask = mask.to(DEVICE)
    ids = None
    if c.n_prefixes:
        ids = torch.randint(0, c.n_prefixes, (c.batch,), generator=gen).to(DEVICE)
    tensors = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    return (*tensors, mask, ids)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_by_rule(name, got, same_dtype, truth, factor, atol):
    """flash-attention's rule: err(kernel) <= factor * err(same-dtype PyTorch) + atol."""
    assert not torch.isnan(got).any(), f"{name}: NaN in result"
    err, ref_err = max_err(got, truth), max_err(same_dtype, truth)
    assert err <= factor * ref_err + atol, f"{name}: err {err:.3e} > {factor} * torch err {ref_err:.3e} + {atol:g}"


ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def check_against_reference(fn, case: Case, dtype: torch.dtype, seed: int = 0, causal=None):
    """Runs ``fn`` (same signature as prefix_attention) and checks out, lse and all five gradients
    against the fp64 reference, with the same-dtype reference setting the error budget."""
    causal = case.causal if causal is None else causal
    q, k, v, pk, pv, mask, ids = make_inputs(case, dtype, seed)
    kwargs = dict(causal=causal, key_padding_mask=mask, prefix_ids=ids)
    out, lse = fn(q, k, v, pk, pv, return_lse=True, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (q, k, v, pk, pv), grad)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    out64, lse64 = prefix_attention_reference(*leaves64, **kwargs)
    grads64 = torch.autograd.grad(out64, leaves64, grad.double())
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out_same, _ = prefix_attention_reference(*leaves, upcast=False, **kwargs)
    grads_same = torch.autograd.grad(out_same, leaves, grad)

    assert out.shape == q.shape and out.dtype == dtype and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    atol = ATOL[dtype]
    assert_close_by_rule("out", out, out_same, out64, 2, atol)
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf rows differ from the reference"
    assert max_err(lse[finite], lse64[finite]) <= 1e-4 * max(1.0, lse64[finite].abs().max().item() if finite.any() else 1.0)
    for name, g, g_same, g64 in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, grads_same, grads64):
        assert g.shape == g64.shape and g.dtype == dtype, name
        assert_close_by_rule(name, g, g_same, g64, 3, atol * 2)
    return out, grads
