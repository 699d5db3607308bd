"""The public op: ``prefix_attention`` -- validation, backend choice and the documented API."""

from __future__ import annotations

import math
import os

import torch

from prefix_kernels.reference import prefix_attention_reference

BACKENDS = ("auto", "triton", "cpu", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch has few kernels for these (no min/max, no argsort): prefix_ids in them are widened to int64.
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)
_LN2 = math.log(2.0)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(name: str, t, ndim: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndim:
        want = " or ".join(f"{n}-D" for n in ndim)
        raise ValueError(f"{name} must be {want}, got {_describe(t)}")


def _check_prefix_ids_dtype(prefix_ids) -> None:
    if not isinstance(prefix_ids, torch.Tensor):
        raise TypeError(f"prefix_ids must be an integer torch.Tensor [B], got {type(prefix_ids).__name__}")
    if prefix_ids.dtype.is_floating_point or prefix_ids.dtype.is_complex or prefix_ids.dtype == torch.bool:
        raise TypeError(f"prefix_ids must be an integer tensor, got {_describe(prefix_ids)}")


def _check_prefix_ids_range(prefix_ids: torch.Tensor, n_prefixes: int) -> None:
    """Every id in [0, T). Eager: one host sync (min and max read back together). While compiling:
    none -- on CUDA a device-side assert (as for an embedding index out of range); on CPU nothing
    here, the ops check the range themselves (the C++ op's TORCH_CHECK, the Triton op's Python),
    since inductor's CPU assert would abort the process."""
    if prefix_ids.numel() == 0:
        return
    if torch.compiler.is_compiling():
        if prefix_ids.device.type == "cuda":
            torch._assert_async(((prefix_ids >= 0) & (prefix_ids < n_prefixes)).all(),
                                f"prefix_ids must be in [0, T={n_prefixes})")
        return
    low, high = torch.stack(torch.aminmax(prefix_ids)).tolist()
    if low < 0 or high >= n_prefixes:
        raise ValueError(f"prefix_ids must be in [0, T={n_prefixes}), got values in [{low}, {high}]")


def check_prefix_ids(prefix_ids: torch.Tensor, num_prefixes: int) -> torch.Tensor:
    """Checks that ``prefix_ids`` is an integer tensor with every value in [0, ``num_prefixes``) and
    returns it as the tensor to pass to :func:`prefix_attention` (uint16/32/64 widened to int64).

    For a model that calls ``prefix_attention`` once per layer with the same ids: check them here
    once per forward, then pass ``prefix_ids_checked=True`` to every layer's call. The range check
    costs one host sync on CUDA in eager mode (none while torch.compile traces: a device-side assert
    there). Raises TypeError/ValueError naming the values and T. The shape is not checked here
    (``prefix_attention`` checks it against q, without a sync).
    """
    _check_prefix_ids_dtype(prefix_ids)
    if prefix_ids.dtype in _WIDE_UNSIGNED:
        prefix_ids = prefix_ids.to(torch.int64)  # a value >= 2^63 wraps negative: refused as out of range
    _check_prefix_ids_range(prefix_ids, num_prefixes)
    return prefix_ids


def validate_inputs(q, k, v, prefix_k, prefix_v, *, causal, scale, key_padding_mask, prefix_ids,
                    prefix_ids_checked=False):
    """Checks every argument; returns the resolved (scale, number of prefixes T).

    Raises TypeError/ValueError naming the argument, what it got and what was expected.
    ``prefix_ids_checked``: skip the range check of prefix_ids (the only check that reads tensor
    values; the caller ran :func:`check_prefix_ids`).
    """
    if not isinstance(causal, bool):  # a string such as "no" would be truthy; numpy/torch bools are refused too
        raise TypeError(f"causal must be a bool (True or False), got {causal!r} of type {type(causal).__name__}")
    _check_tensor("q", q, (4,))
    _check_tensor("k", k, (4,))
    _check_tensor("v", v, (4,))
    _check_tensor("prefix_k", prefix_k, (3, 4))
    _check_tensor("prefix_v", prefix_v, (3, 4))
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {_describe(q)}")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {_describe(t)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {_describe(t)}")

    batch, n_heads, n_queries, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k must be [B={batch}, Hkv, M, D={head_dim}] to match q {tuple(q.shape)}, got {_describe(k)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must have k's shape {tuple(k.shape[:3])} in (B, Hkv, M) (its head dim Dv may differ from "
            f"D), got {_describe(v)}"
        )
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    if n_kv_heads == 0 or n_heads % n_kv_heads != 0:
        raise ValueError(
            f"q's head count Hq={n_heads} must be a multiple of k's head count Hkv={n_kv_heads} "
            f"(q {tuple(q.shape)}, k {tuple(k.shape)})"
        )
    if causal and n_keys < n_queries:
        raise ValueError(
            f"causal attention needs at least as many keys as queries (queries are the last N of M "
            f"positions): k has M={n_keys}, q has N={n_queries}"
        )
    if not 1 <= head_dim <= 256:
        raise ValueError(f"head dim D must be in 1..256, got D={head_dim} (q {_describe(q)})")
    if not 1 <= v.shape[3] <= 256:
        raise ValueError(f"v's head dim Dv must be in 1..256, got Dv={v.shape[3]} (v {_describe(v)})")

    pk_shape = prefix_k.shape[-3:]
    if pk_shape[0] != n_kv_heads or pk_shape[2] != head_dim:
        want = f"[Hkv={n_kv_heads}, P, D={head_dim}] or [T, Hkv={n_kv_heads}, P, D={head_dim}]"
        raise ValueError(f"prefix_k must be {want}, got {_describe(prefix_k)}")
    head_dim_v = v.shape[3]
    if prefix_v.shape != (*prefix_k.shape[:-1], head_dim_v):
        raise ValueError(
            f"prefix_v must have prefix_k's shape {tuple(prefix_k.shape[:-1])} with v's head dim "
            f"Dv={head_dim_v}, got {_describe(prefix_v)}"
        )
    n_prefixes = prefix_k.shape[0] if prefix_k.dim() == 4 else 1

    if prefix_ids is not None:
        _check_prefix_ids_dtype(prefix_ids)
        if prefix_ids.shape != (batch,):
            raise ValueError(f"prefix_ids must be [B={batch}], got {_describe(prefix_ids)}")
        if prefix_ids.device != q.device:
            raise ValueError(f"prefix_ids must be on q's device {q.device}, got {_describe(prefix_ids)}")
        if prefix_k.dim() == 3:
            raise ValueError(
                f"prefix_ids needs a bank of prefixes [T, Hkv, P, D], but prefix_k is {_describe(prefix_k)}"
            )
        if not prefix_ids_checked:
            _check_prefix_ids_range(prefix_ids, n_prefixes)
    elif n_prefixes == 0:
        raise ValueError(
            f"prefix_k holds no prefix (T=0, {_describe(prefix_k)}): pass a bank with T >= 1, or a "
            f"[Hkv, P=0, D] prefix for attention without one"
        )
    elif n_prefixes > 1:
        raise ValueError(
            f"prefix_k holds T={n_prefixes} prefixes ({_describe(prefix_k)}): pass prefix_ids [B] "
            f"to choose one per row"
        )

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool torch.Tensor [B, M], got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = attend), got {_describe(key_padding_mask)}")
        if key_padding_mask.shape != (batch, n_keys):
            raise ValueError(
                f"key_padding_mask must be [B={batch}, M={n_keys}], got {_describe(key_padding_mask)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(
                f"key_padding_mask must be on q's device {q.device}, got {_describe(key_padding_mask)}"
            )

    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    return float(scale), n_prefixes


def validate_features(q, *, sliding_window, softcap, sinks) -> float | None:
    """Checks the optional attention features; returns softcap as a float (or None).

    ``sliding_window``: an int >= 1. ``softcap``: a finite float > 0. ``sinks``: a [Hq] tensor on q's
    device, in q's dtype or float32. Raises TypeError/ValueError naming the argument."""
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
            raise TypeError(f"sliding_window must be an int >= 1 (or None), got {sliding_window!r}")
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 (keys per query's window), got {sliding_window}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a positive finite float (or None), got {softcap!r}")
        if not math.isfinite(softcap) or softcap <= 0:
            raise ValueError(f"softcap must be a positive finite float, got {softcap!r}")
        softcap = float(softcap)
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor):
            raise TypeError(f"sinks must be a torch.Tensor [Hq] (or None), got {type(sinks).__name__}")
        if sinks.shape != (q.shape[1],):
            raise ValueError(f"sinks must be [Hq={q.shape[1]}] (one logit per query head), got {_describe(sinks)}")
        if sinks.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"sinks must have q's dtype {q.dtype} or float32, got {_describe(sinks)}")
        if sinks.device != q.device:
            raise ValueError(f"sinks must be on q's device {q.device}, got {_describe(sinks)}")
    return softcap


# The kernels scale sink logits by log2(e) and subtract running maxima: a sink near fp32's max (or +inf)
# overflows to inf there and inf - inf gives NaN. A sink above this bound already takes the whole
# softmax (out = 0, zero gradients): lowering it to the bound changes only that head's (finite) lse.
_SINK_BOUND = torch.finfo(torch.float32).max / 16


def bound_sinks(sinks: torch.Tensor | None) -> torch.Tensor | None:
    """``sinks`` with values above a large finite bound (+inf included) lowered to it, on the device
    (no host sync), so that every backend computes out = 0 and a finite lse for such a head instead
    of NaN. -inf stays: it is a sink that never takes weight. The gradient passes through unchanged
    below the bound and is 0 above it (where the exact gradient, -p_sink * (do . out), is 0 too)."""
    if sinks is None:
        return None
    return sinks.clamp(max=min(torch.finfo(sinks.dtype).max, _SINK_BOUND))


def _triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Maps ``backend`` to the implementation that runs for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu":
            from prefix_kernels import cpu

            return "cpu" if cpu.is_available() else "reference"
        return "reference"
    if backend == "triton" and not _triton_usable(device):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter), "
            f"got tensors on {device}"
        )
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        from prefix_kernels import cpu

        if not cpu.is_available():
            raise ValueError(f"backend='cpu' is unavailable: {cpu.unavailable_reason()}")
    return backend


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    prefix_ids: torch.Tensor | None = None,
    prefix_ids_checked: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
):
    r"""Attention over a trainable prefix and the sequence keys/values, fused, without concatenation.

    Shapes (B batch, Hq query heads, Hkv key/value heads with Hq % Hkv == 0, N queries,
    M >= N keys, P prefix tokens (0 allowed), T prefixes in a bank, D and Dv head dims in 1..256)::

        q                 [B, Hq,  N, D]   any strides (HF's transposed [B, N, H, D] views work)
        k, v              [B, Hkv, M, D]   sequence keys/values (v: [.., Dv]); the first M - N are cached
        prefix_k/prefix_v [Hkv, P, D]      one prefix shared by every row (prefix_v: [.., Dv]), or
                          [T, Hkv, P, D]   a bank, with prefix_ids [B] choosing each row's prefix
        key_padding_mask  [B, M] bool      True = attend (HF attention_mask); left or right padding
        sinks             [Hq]             optional per-head sink logits (q's dtype or fp32)
        -> out            [B, Hq, N, Dv]   q's dtype (and lse [B, Hq, N] fp32, natural log)

    Query i sits at position M - N + i (bottom-right aligned causal). What query i sees, for
    P = 2, M = 5, N = 3 (``#`` visible, ``.`` masked; prefix columns are always visible)::

                    prefix | cache   sequence
                    p0 p1  | k0 k1 | k2 k3 k4
        q0 (pos 2)   #  #  |  #  # |  #  .  .
        q1 (pos 3)   #  #  |  #  # |  #  #  .
        q2 (pos 4)   #  #  |  #  # |  #  #  #

    with ``causal=False`` every key is visible; a False in ``key_padding_mask`` hides that key
    column for the row. One online softmax spans the prefix and the sequence. A query that sees no
    key at all (P = 0 and all its keys hidden) gets out = 0, lse = -inf and zero gradients.
    NaN/inf in the inputs propagate to out, lse and the gradients as in the fp32 reference. Hidden
    keys must still hold finite values: as with SDPA and flash-attention, a NaN in k or v of a
    padded or causally hidden key can reach out and dq through 0 * NaN.

    Args:
        scale: softmax scale, default 1/sqrt(D).
        sliding_window: W >= 1: the query at position i sees sequence key j only if i - W < j (and
            j <= i; |i - j| < W when not causal), transformers' convention. The prefix stays
            visible to every query (unlike PEFT, whose cached prefix falls out of the window).
            Key blocks outside every query's window are never read: the cost grows with W.
        softcap: c > 0: every score (prefix and sequence, after scaling) becomes c * tanh(s / c).
        sinks: [Hq] logits that join every softmax denominator of their head with no value
            (gpt-oss); lse includes them; differentiable.
        prefix_ids_checked: True when the caller has already run
            ``check_prefix_ids(prefix_ids, T)`` on these ids: the range check, the one check that
            reads tensor values (a host sync on CUDA), is skipped; every other check still runs.
            A model calling this once per layer checks once per forward instead of once per layer
            (``PrefixTuningModel`` does). An id out of range is then undefined behaviour.
        return_lse: also return the log-sum-exp of the scaled scores (not differentiable).
        deterministic: bit-identical gradients run to run. The Triton backward then reduces the
            prefix gradients through fp32 partials summed in a fixed order instead of fp32 atomics.
        backend: "auto" (Triton for CUDA tensors; the C++ op for CPU tensors when it is built,
            else the reference), "triton", "cpu" or "reference".

    Gradients flow to q, k, v, prefix_k, prefix_v (and sinks); only those whose tensors require grad are
    computed, and no kernel runs for the rest. fp16/bf16/fp32 (and fp64) inputs accumulate in fp32
    (fp64 for fp64).
    """
    if isinstance(prefix_ids, torch.Tensor) and prefix_ids.dtype in _WIDE_UNSIGNED:
        prefix_ids = prefix_ids.to(torch.int64)  # a value >= 2^63 wraps negative: refused as out of range
    scale, _ = validate_inputs(
        q, k, v, prefix_k, prefix_v, causal=causal, scale=scale,
        key_padding_mask=key_padding_mask, prefix_ids=prefix_ids, prefix_ids_checked=prefix_ids_checked,
    )
    softcap = validate_features(q, sliding_window=sliding_window, softcap=softcap, sinks=sinks)
    sinks = bound_sinks(sinks)
    features = dict(sliding_window=sliding_window, softcap=softcap, sinks=sinks)
    chosen = resolve_backend(backend, q.device)
    if chosen == "reference":
        out, lse = prefix_attention_reference(
            q, k, v, prefix_k, prefix_v, causal=causal, scale=scale,
            key_padding_mask=key_padding_mask, prefix_ids=prefix_ids, **features,
        )
        lse = lse.detach()
    elif chosen == "cpu":
        from prefix_kernels import cpu

        out, lse = cpu.prefix_attention_cpu(
            q, k, v, prefix_k, prefix_v, causal=causal, scale=scale,
            key_padding_mask=key_padding_mask, prefix_ids=prefix_ids,
            **{name: value for name, value in features.items() if value is not None},
        )
    else:
        from prefix_kernels.autograd import PrefixAttentionFunction

        args = (q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale, deterministic,
                sliding_window, softcap, sinks)
        if torch.compiler.is_compiling():  # the registered op: one graph node, fake impls, autograd
            out, lse2 = torch.ops.prefix_kernels.triton_fwd(*args)
        else:
            out, lse2 = PrefixAttentionFunction.apply(*args)
        if not return_lse:
            return out
        lse = lse2 * _LN2  # the kernels keep it in log2 units
    return (out, lse) if return_lse else out
