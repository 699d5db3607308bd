"""Bad input: a clear TypeError/ValueError naming the argument, never a silent wrong answer."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers import Case
from prefix_kernels import prefix_attention

VALID = Case(batch=2, heads=4, kv_heads=2, n_queries=5, n_keys=7, n_prefix=3, head_dim=16)


def inputs(**sizes):
    """{"q": ..., "prefix_v": ...} of VALID with ``sizes`` (Case fields) replaced: plain CPU tensors."""
    return replace(VALID, **sizes).make(torch.float32, "cpu", requires_grad=False).named()


def call(overrides=None, **kwargs):
    args = inputs()
    args.update(overrides or {})
    return prefix_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("prefix_k"),
                            args.pop("prefix_v"), backend="reference", **kwargs)


BAD = [
    ("q 3-D", dict(q=torch.randn(4, 5, 16)), {}, ValueError, r"q must be 4-D.*\(4, 5, 16\)"),
    ("q int", dict(q=torch.ones(2, 4, 5, 16, dtype=torch.int32)), {}, TypeError, r"q must be float.*int32"),
    ("k dtype", dict(k=torch.randn(2, 2, 7, 16, dtype=torch.float64)), {}, TypeError, r"k must have q's dtype"),
    ("k batch", dict(k=torch.randn(3, 2, 7, 16)), {}, ValueError, r"k must be \[B=2, Hkv, M, D=16\]"),
    ("k head dim", dict(k=torch.randn(2, 2, 7, 8)), {}, ValueError, r"k must be \[B=2.*D=16"),
    ("v shape", dict(v=torch.randn(2, 2, 6, 16)), {}, ValueError, r"v must have k's shape \(2, 2, 7\) in \(B, Hkv, M\)"),
    ("heads", dict(q=torch.randn(2, 3, 5, 16)), {}, ValueError, r"Hq=3 must be a multiple of.*Hkv=2"),
    ("M < N", dict(k=torch.randn(2, 2, 4, 16), v=torch.randn(2, 2, 4, 16)), {}, ValueError, r"M=4.*N=5"),
    ("prefix heads", dict(prefix_k=torch.randn(3, 3, 16), prefix_v=torch.randn(3, 3, 16)), {}, ValueError,
     r"prefix_k must be \[Hkv=2, P, D=16\]"),
    ("prefix_v shape", dict(prefix_v=torch.randn(2, 4, 16)), {}, ValueError, r"prefix_v must have prefix_k's"),
    ("prefix 2-D", dict(prefix_k=torch.randn(3, 16)), {}, ValueError, r"prefix_k must be 3-D or 4-D"),
    ("bank without ids", dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16)), {},
     ValueError, r"T=3 prefixes.*pass prefix_ids"),
    ("ids without bank", {}, dict(prefix_ids=torch.zeros(2, dtype=torch.long)), ValueError,
     r"prefix_ids needs a bank"),
    ("ids float", dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16)),
     dict(prefix_ids=torch.zeros(2)), TypeError, r"prefix_ids must be an integer tensor.*float32"),
    ("ids range", dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16)),
     dict(prefix_ids=torch.tensor([0, 3])), ValueError, r"prefix_ids must be in \[0, T=3\).*\[0, 3\]"),
    ("ids negative", dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16)),
     dict(prefix_ids=torch.tensor([-1, 0])), ValueError, r"prefix_ids must be in"),
    ("ids shape", dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16)),
     dict(prefix_ids=torch.zeros(3, dtype=torch.long)), ValueError, r"prefix_ids must be \[B=2\]"),
    ("mask dtype", {}, dict(key_padding_mask=torch.ones(2, 7)), TypeError, r"key_padding_mask must be bool"),
    ("mask shape", {}, dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError,
     r"key_padding_mask must be \[B=2, M=7\].*\(2, 5\)"),
    ("mask 4-D", {}, dict(key_padding_mask=torch.ones(2, 1, 5, 7, dtype=torch.bool)), ValueError,
     r"key_padding_mask must be \[B=2, M=7\]"),
    ("scale", {}, dict(scale=-1.0), ValueError, r"scale must be a positive finite float"),
    ("scale nan", {}, dict(scale=float("nan")), ValueError, r"scale must be"),
    ("backend", {}, dict(backend="cuda"), ValueError, r"backend must be one of"),
    ("not a tensor", dict(q=[[1.0]]), {}, TypeError, r"q must be a torch.Tensor, got list"),
    ("head dim", dict(q=torch.randn(2, 4, 5, 300), k=torch.randn(2, 2, 7, 300), v=torch.randn(2, 2, 7, 300),
                      prefix_k=torch.randn(2, 3, 300), prefix_v=torch.randn(2, 3, 300)), {}, ValueError,
     r"head dim D must be in 1..256"),
]


@pytest.mark.parametrize("overrides, kwargs, error, pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_refused_with_a_clear_error(overrides, kwargs, error, pattern):
    if "backend" in kwargs:
        args = inputs()
        with pytest.raises(error, match=pattern):
            prefix_attention(*args.values(), **kwargs)
        return
    with pytest.raises(error, match=pattern):
        call(overrides, **kwargs)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors.*cpu"):
        prefix_attention(*inputs().values(), backend="triton")


def test_mixed_devices_are_refused():
    args = inputs()
    args["k"] = args["k"].to("meta")
    with pytest.raises(ValueError, match=r"k must be on q's device cpu.*meta"):
        prefix_attention(*args.values(), backend="reference")


def test_non_causal_allows_fewer_keys_than_queries():
    args = inputs(n_keys=3)
    out = prefix_attention(*args.values(), causal=False, backend="reference")
    assert out.shape == args["q"].shape
