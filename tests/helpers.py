"""Shared test helpers: device and backend choice, the one builder of attention test problems
(:class:`Case`), and the flash-attention tolerance rule."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import pytest
import torch

from prefix_kernels import cpu
from prefix_kernels.reference import prefix_attention_reference

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TRITON_RUNNABLE = ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"
requires_triton = pytest.mark.skipif(not TRITON_RUNNABLE, reason="needs CUDA or TRITON_INTERPRET=1")
requires_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


def need(backend: str) -> None:
    """Skips the calling test when ``backend`` cannot run here ("cpu": the C++ op cannot be built --
    checked when the test runs, as the first check builds it; "triton": neither CUDA nor
    TRITON_INTERPRET=1)."""
    if backend == "cpu" and not cpu.is_available():
        pytest.skip(f"C++ CPU op unavailable: {cpu.unavailable_reason()}")
    if backend == "triton" and not TRITON_RUNNABLE:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")


def backend_device(backend: str) -> torch.device:
    """Triton runs on CUDA tensors when there is a GPU, else in the interpreter on CPU tensors; the
    other backends run on the CPU."""
    return DEVICE if backend == "triton" else torch.device("cpu")


# ---------------------------------------------------------------- the attention test problem

SEQ_LAYOUTS = ("contig", "bshd", "d_strided", "expanded")
PREFIX_LAYOUTS = ("contig", "p_sliced", "phd")
MASK_LAYOUTS = ("contig", "strided", "transposed")
PADDINGS = (None, "left", "right", "left_any", "right_any", "random", "dead_rows", "all_padded", "all_visible")


@dataclass(frozen=True)
class Case:
    """One attention problem: sizes, causality, padding, prefix bank and memory layouts; :meth:`make`
    builds its tensors. On a GPU :meth:`on_device` scales the sizes up by ``gpu_scale``.

    ``padding``: None (no mask); "left"/"right" (each row keeps a random length in 1..M, row 0
    about M/3: no row loses every key); "left_any"/"right_any" (lengths in 0..M: rows may be fully
    padded); "random" (each key kept with p 0.7); "dead_rows" (p 0.6, about half the rows fully
    padded); "all_padded"; "all_visible".

    Layouts (the values are the same whatever the layout, only the strides differ): q/k/v and the
    incoming gradient "contig" [B, H, S, D], "bshd" (a transposed [B, S, H, D] view, as HF hands
    them), "d_strided" (inner stride 2), "expanded" (stride 0 over the batch); the prefix "contig",
    "p_sliced" (a slice of a longer prefix: non-contiguous along P), "phd" (a transposed [P, Hkv, D]
    view); the mask "contig", "strided" (stride 2 along M), "transposed" (column-major).
    ``strided=True`` is short for q/k/v "bshd" and prefix "p_sliced".

    ``q_scale`` multiplies q's fp32 draw before the cast (larger scores: softcaps bite, logits
    saturate); 1.0 leaves every draw as it is.
    """

    batch: int = 2
    heads: int = 2
    kv_heads: int = 2
    n_queries: int = 16
    n_keys: int = 16
    n_prefix: int = 4
    head_dim: int = 32
    head_dim_v: int | None = None  # v / prefix_v's head dim Dv; None: D
    causal: bool = True
    padding: str | None = None
    n_prefixes: int | None = None  # a bank of T prefixes [T, Hkv, P, D]; None: one shared [Hkv, P, D]
    with_ids: bool = True  # with a bank, draw prefix_ids [B] in 0..T-1 (False: the caller picks, if any)
    ids_dtype: torch.dtype = torch.int64
    ids_strided: bool = False  # prefix_ids as a stride-2 view
    strided: bool = False
    q_layout: str = "contig"
    kv_layout: str = "contig"
    prefix_layout: str = "contig"
    mask_layout: str = "contig"
    go_layout: str = "contig"
    scale: float | None = None
    gpu_scale: int = 8
    q_scale: float = 1.0

    def __post_init__(self):
        for name, allowed in (("q_layout", SEQ_LAYOUTS), ("kv_layout", SEQ_LAYOUTS), ("go_layout", SEQ_LAYOUTS),
                              ("prefix_layout", PREFIX_LAYOUTS), ("mask_layout", MASK_LAYOUTS),
                              ("padding", PADDINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Case.{name} must be one of {allowed}, got {getattr(self, name)!r}")

    # the usual symbols
    B = property(lambda self: self.batch)
    Hq = property(lambda self: self.heads)
    Hkv = property(lambda self: self.kv_heads)
    N = property(lambda self: self.n_queries)
    M = property(lambda self: self.n_keys)
    P = property(lambda self: self.n_prefix)
    D = property(lambda self: self.head_dim)
    T = property(lambda self: self.n_prefixes)

    @property
    def has_ids(self) -> bool:
        return self.n_prefixes is not None and self.with_ids

    def on_device(self) -> Case:
        if not ON_GPU:
            return self
        s = self.gpu_scale
        return replace(self, n_queries=max(1, self.n_queries * s) if self.n_queries > 1 else 1,
                       n_keys=self.n_keys * s, n_prefix=self.n_prefix * (s // 2 if self.n_prefix > 1 else 1),
                       batch=self.batch * 2)

    def make(self, dtype: torch.dtype = torch.float32, device=DEVICE, seed: int = 0,
             requires_grad: bool | tuple[bool, ...] = True) -> Inputs:
        """The tensors, drawn as fp32 ``randn`` from one CPU generator seeded ``seed`` in the order q,
        k, v, prefix_k, prefix_v, mask, prefix_ids, grad_out, then cast and moved: a case and seed give
        the same values on every device. q..prefix_v are leaves (``requires_grad``: one flag, or one
        per tensor)."""
        gen = torch.Generator().manual_seed(seed)
        dev = torch.device(device)
        seq_layout = "bshd" if self.strided else None
        prefix_layout = "p_sliced" if self.strided else self.prefix_layout
        b, hkv, d = self.batch, self.kv_heads, self.head_dim
        dv = self.head_dim if self.head_dim_v is None else self.head_dim_v
        q = self._seq(gen, (b, self.heads, self.n_queries, d), seq_layout or self.q_layout, dtype, dev,
                      self.q_scale)
        k = self._seq(gen, (b, hkv, self.n_keys, d), seq_layout or self.kv_layout, dtype, dev)
        v = self._seq(gen, (b, hkv, self.n_keys, dv), seq_layout or self.kv_layout, dtype, dev)
        lead = () if self.n_prefixes is None else (self.n_prefixes,)
        pk = self._prefix(gen, lead, prefix_layout, dtype, dev)
        pv = self._prefix(gen, lead, prefix_layout, dtype, dev, dv)
        mask = self._mask(gen, dev)
        ids = None
        if self.has_ids:
            ids = torch.randint(0, self.n_prefixes, (b,), generator=gen).to(dev, self.ids_dtype)
            if self.ids_strided:
                wide = torch.zeros(2 * b, dtype=self.ids_dtype, device=dev)
                wide[::2] = ids
                ids = wide[::2]
        go = self._seq(gen, (b, self.heads, self.n_queries, dv), self.go_layout, dtype, dev)
        flags = (requires_grad,) * 5 if isinstance(requires_grad, bool) else tuple(requires_grad)
        q, k, v, pk, pv = (t.detach().requires_grad_(f) for t, f in zip((q, k, v, pk, pv), flags))  # keeps strides
        return Inputs(q, k, v, pk, pv, mask, ids, go, self.causal, self.scale)

    def make_sinks(self, dtype: torch.dtype = torch.float32, device=DEVICE, seed: int = 0) -> torch.Tensor:
        """Per-head sink logits [Hq] for ``seed`` (not a leaf): the ones check_against_reference draws,
        fp32 ``randn`` from a CPU generator seeded ``seed + 2``, then cast and moved."""
        return torch.randn(self.heads, generator=torch.Generator().manual_seed(seed + 2)).to(device, dtype)

    @staticmethod
    def _seq(gen, shape, layout, dtype, dev, mul=1.0):
        b, h, s, d = shape

        def draw(*size):  # x * 1.0 == x exactly: mul=1.0 leaves the draw as it is
            return (torch.randn(*size, generator=gen) * mul).to(dev, dtype)

        if layout == "bshd":
            return draw(b, s, h, d).transpose(1, 2)
        if layout == "d_strided":
            return draw(b, h, s, 2 * d)[..., ::2]
        if layout == "expanded":
            return draw(1, h, s, d).expand(b, h, s, d)
        return draw(b, h, s, d)

    def _prefix(self, gen, lead, layout, dtype, dev, d=None):
        hkv, p, d = self.kv_heads, self.n_prefix, self.head_dim if d is None else d
        if layout == "p_sliced":
            return torch.randn(*lead, hkv, p + 3, d, generator=gen).to(dev, dtype)[..., 3:, :]
        if layout == "phd":
            return torch.randn(*lead, p, hkv, d, generator=gen).to(dev, dtype).transpose(-3, -2)
        return torch.randn(*lead, hkv, p, d, generator=gen).to(dev, dtype)

    def _mask(self, gen, dev):
        kind, b, m = self.padding, self.batch, self.n_keys
        if kind is None:
            return None
        if kind in ("left", "right"):
            lengths = torch.randint(1, m + 1, (b,), generator=gen)
            lengths[0] = max(1, m // 3)  # at least one row well padded
        else:
            lengths = torch.randint(0, m + 1, (b,), generator=gen)
        pos = torch.arange(m)
        if kind == "random":
            mask = torch.rand(b, m, generator=gen) < 0.7
        elif kind == "dead_rows":
            mask = torch.rand(b, m, generator=gen) < 0.6
            mask[torch.rand(b, generator=gen) < 0.5] = False
        elif kind == "all_padded":
            mask = torch.zeros(b, m, dtype=torch.bool)
        elif kind == "all_visible":
            mask = torch.ones(b, m, dtype=torch.bool)
        elif kind in ("left", "left_any"):
            mask = pos[None, :] >= (m - lengths)[:, None]
        else:
            mask = pos[None, :] < lengths[:, None]
        mask = mask.to(dev)
        if self.mask_layout == "strided":
            wide = torch.zeros(b, 2 * m, dtype=torch.bool, device=dev)
            wide[:, ::2] = mask
            return wide[:, ::2]
        if self.mask_layout == "transposed":
            return mask.t().contiguous().t()
        return mask.contiguous()


NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


@dataclass
class Inputs:
    """What :meth:`Case.make` builds. Unpacks as (q, k, v, prefix_k, prefix_v, key_padding_mask,
    prefix_ids); ``grad_out`` [B, Hq, N, D] is an incoming gradient for out."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    key_padding_mask: torch.Tensor | None
    prefix_ids: torch.Tensor | None
    grad_out: torch.Tensor
    causal: bool = True
    scale: float | None = None

    def __iter__(self):
        return iter((*self.tensors, self.key_padding_mask, self.prefix_ids))

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(q, k, v, prefix_k, prefix_v)."""
        return self.q, self.k, self.v, self.prefix_k, self.prefix_v

    def named(self) -> dict[str, torch.Tensor]:
        """{"q": q, ..., "prefix_v": prefix_v}."""
        return dict(zip(NAMES, self.tensors))

    @property
    def kwargs(self) -> dict:
        """prefix_attention's keyword arguments for this problem: causal, scale, mask, prefix_ids."""
        return dict(causal=self.causal, scale=self.scale, key_padding_mask=self.key_padding_mask,
                    prefix_ids=self.prefix_ids)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_by_rule(name, got, same_dtype, truth, factor, atol):
    """flash-attention's rule: err(kernel) <= factor * err(same-dtype PyTorch) + atol."""
    assert not torch.isnan(got).any(), f"{name}: NaN in result"
    err, ref_err = max_err(got, truth), max_err(same_dtype, truth)
    assert err <= factor * ref_err + atol, f"{name}: err {err:.3e} > {factor} * torch err {ref_err:.3e} + {atol:g}"


ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def check_against_reference(fn, case: Case, dtype: torch.dtype, seed: int = 0, causal=None, device=None,
                            sliding_window=None, softcap=None, sinks: bool = False):
    """Runs ``fn`` (same signature as prefix_attention) and checks out, lse and all five gradients
    (six with ``sinks``: per-head sink logits drawn here, in q's dtype, with their gradient) against
    the fp64 reference, with the same-dtype reference setting the error budget. ``device``: where the
    inputs live (default DEVICE)."""
    causal = case.causal if causal is None else causal
    device = DEVICE if device is None else device
    q, k, v, pk, pv, mask, ids = case.make(dtype, device, seed=seed)
    inputs = [q, k, v, pk, pv]
    if sinks:
        inputs.append(case.make_sinks(dtype, device, seed).requires_grad_())
    names = ("dq", "dk", "dv", "dprefix_k", "dprefix_v", "dsinks")[: len(inputs)]

    def run(op, tensors, **extra):
        features = dict(sliding_window=sliding_window, softcap=softcap, sinks=tensors[5] if sinks else None)
        features = {key: value for key, value in features.items() if value is not None}
        if case.scale is not None:
            features["scale"] = case.scale
        return op(*tensors[:5], causal=causal, key_padding_mask=mask, prefix_ids=ids, **features, **extra)

    out, lse = run(fn, inputs, return_lse=True)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    grads = torch.autograd.grad(out, inputs, grad)

    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    out64, lse64 = run(prefix_attention_reference, leaves64)
    grads64 = torch.autograd.grad(out64, leaves64, grad.double())
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out_same, _ = run(prefix_attention_reference, leaves, upcast=False)
    grads_same = torch.autograd.grad(out_same, leaves, grad)

    assert out.shape == (*q.shape[:3], v.shape[3]) and out.dtype == dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    atol = ATOL[dtype]
    assert_close_by_rule("out", out, out_same, out64, 2, atol)
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf rows differ from the reference"
    assert max_err(lse[finite], lse64[finite]) <= 1e-4 * max(1.0, lse64[finite].abs().max().item() if finite.any() else 1.0)
    for name, g, g_same, g64 in zip(names, grads, grads_same, grads64):
        assert g.shape == g64.shape and g.dtype == dtype, name
        assert_close_by_rule(name, g, g_same, g64, 3, atol * 2 * (max(1.0, g64.abs().max().item()) if name == "dsinks" else 1))
    return out, grads
