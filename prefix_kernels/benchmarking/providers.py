"""The attention implementations the kernel benchmark compares.

Every provider computes causal attention over a shared prefix [Hkv, P, D] followed by the sequence
keys/values, query i at position M - N + i, the prefix always visible; ``fn(q, k, v, prefix_k,
prefix_v) -> out [B, Hq, N, D]``:

    ours            prefix_attention(..., backend="auto"): Triton on CUDA, the C++ op on CPU
                    (the reference when the C++ op could not be built)
    peft_style      what PEFT's prefix tuning amounts to: expand the prefix per row, torch.cat,
                    repeat_kv (repeat_interleave of the K/V heads), an explicit [B, 1, N, P + M]
                    bool mask, F.scaled_dot_product_attention
    cat_sdpa        torch.cat of the prefix + SDPA with ``causal_lower_right`` and enable_gqa
    sdpa_no_prefix  the floor: SDPA with no prefix at all (bottom-right causal: is_causal when
                    N = M, no mask when N = 1, else causal_lower_right) -- the attention the
                    model does anyway
    flex_attention  torch.cat + torch.compile'd FlexAttention with a mask_mod that keeps the
                    prefix columns visible and is bottom-right causal on the rest (block mask built
                    once per shape, outside the timing). CUDA only.
    flash_attn      flash-attn's flash_attn_func(causal=True) on the concatenated K/V (bottom-right
                    causal since flash-attn 2.1, so the prefix is visible). CUDA, fp16/bf16, when
                    the ``flash_attn`` package is importable.

With a sliding window W (a shape's ``W``; the query at position i sees sequence key j only if
i - W < j <= i, the prefix always visible) a provider is called ``fn(..., window=W)``:

    ours            sliding_window=W (key blocks outside every window are skipped)
    peft_style      the window folded into its explicit mask (prefix columns stay True)
    cat_sdpa        an explicit [N, P + M] bool mask (prefix columns True, the sequence bottom-right
                    causal and windowed) instead of causal_lower_right
    sdpa_no_prefix  an explicit [N, M] bool mask, bottom-right causal and windowed
    flex_attention  the window in its mask_mod (:func:`prefix_mask_mod`)
    flash_attn      not applicable: window_size=(W - 1, 0) on the concatenated K/V would also hide
                    the prefix columns from every query more than W positions past them, and
                    flash_attn_func cannot keep some columns always visible; its rows are
                    "skipped" with that reason rather than timing a different computation.

A provider that is not available (CPU, package missing, dtype, a window it cannot express) gives
rows with status "skipped" and the reason in ``error``.

Two more, for the shared-prefix decode comparison (by name only, not among the default "all"
providers, :data:`EXTRA_PROVIDERS`):

    ours_prefix_in_cache  ours with the prefix copied into every row's KV cache (torch.cat once per
                          input tensors, outside the timing; on every call when gradients are
                          needed) and no prefix: the same FLOPs as ours, with B x the prefix's bytes
    ours_no_cascade       ours with the shared-prefix cascade off (the C++ op's and the Triton
                          decode's per-row path)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from prefix_kernels.functional import prefix_attention

def _expand_prefix(prefix, batch):
    return prefix.unsqueeze(0).expand(batch, -1, -1, -1)


def sequence_mask(n_queries: int, n_keys: int, window: int | None, device) -> torch.Tensor:
    """[N, M] bool, True = visible: bottom-right causal (query i at position M - N + i) and, with a
    window W, only the keys j with i - W < j."""
    query_pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    key_pos = torch.arange(n_keys, device=device)[None, :]
    visible = key_pos <= query_pos
    return visible if window is None else visible & (key_pos > query_pos - window)


def prefix_mask(n_queries: int, n_prefix: int, n_keys: int, window: int | None, device) -> torch.Tensor:
    """[N, P + M] bool: the prefix columns always visible, then :func:`sequence_mask`."""
    ones = torch.ones(n_queries, n_prefix, dtype=torch.bool, device=device)
    return torch.cat([ones, sequence_mask(n_queries, n_keys, window, device)], dim=1)


def ours(q, k, v, prefix_k, prefix_v, window=None):
    return prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, sliding_window=window, backend="auto")


def peft_style(q, k, v, prefix_k, prefix_v, window=None):
    """expand + cat + repeat_kv + a materialized [B, 1, N, P + M] mask + SDPA."""
    batch, n_heads, n_queries, _ = q.shape
    group = n_heads // k.shape[1]
    keys = torch.cat([_expand_prefix(prefix_k, batch), k], dim=2).repeat_interleave(group, dim=1)
    values = torch.cat([_expand_prefix(prefix_v, batch), v], dim=2).repeat_interleave(group, dim=1)
    mask = prefix_mask(n_queries, prefix_k.shape[1], k.shape[2], window, q.device)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.expand(batch, 1, -1, -1))


def concat_sdpa(q, k, v, prefix_k, prefix_v, window=None):
    """torch.cat of the prefix + SDPA with bottom-right causal (``causal_lower_right``; with a
    window, an explicit [N, P + M] mask)."""
    from torch.nn.attention.bias import causal_lower_right

    batch = q.shape[0]
    keys = torch.cat([_expand_prefix(prefix_k, batch), k], dim=2)
    values = torch.cat([_expand_prefix(prefix_v, batch), v], dim=2)
    if window is None:
        mask = causal_lower_right(q.shape[2], keys.shape[2])
    else:
        mask = prefix_mask(q.shape[2], prefix_k.shape[1], k.shape[2], window, q.device)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def sdpa_no_prefix(q, k, v, prefix_k=None, prefix_v=None, window=None):
    """The floor: bottom-right causal SDPA over the sequence keys only (with a window, an explicit
    [N, M] mask)."""
    n, m = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if window is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sequence_mask(n, m, window, q.device),
                                              enable_gqa=gqa)
    if n == m:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if n == 1:  # one query at the last position sees every key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, m), enable_gqa=gqa)


_in_cache_state: dict = {"key": None, "cache": None}


def ours_prefix_in_cache(q, k, v, prefix_k, prefix_v):
    """ours with no prefix, over caches that hold the prefix in front of every row's keys: built once
    per set of input tensors, outside the timing (the KV cache a model would keep), or on every call
    when gradients are needed (training modes: the copy is part of the step)."""
    inputs = (k, v, prefix_k, prefix_v)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        batch = k.shape[0]
        keys = torch.cat([_expand_prefix(prefix_k, batch), k], dim=2)
        values = torch.cat([_expand_prefix(prefix_v, batch), v], dim=2)
        return prefix_attention(q, keys, values, prefix_k[:, :0], prefix_v[:, :0], causal=True, backend="auto")
    seen = _in_cache_state["key"]  # weak references (a dead one never matches) and versions
    if seen is None or any(ref() is not t or version != t._version for (ref, version), t in zip(seen, inputs)):
        _in_cache_state["key"], _in_cache_state["cache"] = None, None  # free the previous copy first
        batch = k.shape[0]
        _in_cache_state["cache"] = (torch.cat([_expand_prefix(prefix_k, batch), k], dim=2).detach(),
                                    torch.cat([_expand_prefix(prefix_v, batch), v], dim=2).detach())
        _in_cache_state["key"] = [(weakref.ref(t), t._version) for t in inputs]
    keys, values = _in_cache_state["cache"]
    return prefix_attention(q, keys, values, prefix_k[:, :0], prefix_v[:, :0], causal=True, backend="auto")


def ours_no_cascade(q, k, v, prefix_k, prefix_v, window=None):
    """ours with the shared-prefix cascade turned off: on CPU the C++ op with
    ``CPUOptions(cascade=False)`` (the environment's other options kept), on CUDA the Triton decode
    under ``override_configs(shared_prefix_decode=False)``; the reference (no cascade to turn off)
    when the C++ op could not be built."""
    if q.device.type == "cpu":
        from prefix_kernels import cpu

        if not cpu.is_available():
            return ours(q, k, v, prefix_k, prefix_v, window)
        out, _ = cpu.prefix_attention_cpu(
            q, k, v, prefix_k, prefix_v, causal=True, scale=q.shape[-1] ** -0.5, key_padding_mask=None,
            prefix_ids=None, sliding_window=window, options=replace(cpu.ENV_OPTIONS, cascade=False))
        return out
    from prefix_kernels.kernels.configs import override_configs

    with override_configs(shared_prefix_decode=False):
        return ours(q, k, v, prefix_k, prefix_v, window)


_flex_state: dict = {"compiled": None, "masks": {}}


def prefix_mask_mod(n_prefix: int, offset: int, window: int | None = None):
    """FlexAttention mask_mod over [prefix | sequence] keys: the prefix columns always visible, the
    sequence bottom-right causal (``offset`` = M - N) and, with a window W, only the keys after
    position - W."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < n_prefix) | (kv_idx - n_prefix <= q_idx + offset)

    def windowed_mask_mod(b, h, q_idx, kv_idx):
        key_pos, query_pos = kv_idx - n_prefix, q_idx + offset
        return (kv_idx < n_prefix) | ((key_pos <= query_pos) & (key_pos > query_pos - window))

    return mask_mod if window is None else windowed_mask_mod


def flex_attention_cat(q, k, v, prefix_k, prefix_v, window=None):
    """torch.cat + compiled FlexAttention with :func:`prefix_mask_mod` (block mask cached per shape
    and window)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex_state["compiled"] is None:
        try:  # every shape and grad mode is a recompile; the default limit (8) would fall back to eager
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        except AttributeError:  # older torch
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        _flex_state["compiled"] = torch.compile(flex_attention, dynamic=False)
    batch, n_prefix, n, m = q.shape[0], prefix_k.shape[1], q.shape[2], k.shape[2]
    key = (n, m, n_prefix, window, str(q.device))
    block_mask = _flex_state["masks"].get(key)
    if block_mask is None:
        block_mask = create_block_mask(prefix_mask_mod(n_prefix, m - n, window), None, None, n, n_prefix + m,
                                       device=q.device)
        _flex_state["masks"][key] = block_mask
    keys = torch.cat([_expand_prefix(prefix_k, batch), k], dim=2)
    values = torch.cat([_expand_prefix(prefix_v, batch), v], dim=2)
    return _flex_state["compiled"](q, keys, values, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def flash_attn_cat(q, k, v, prefix_k, prefix_v):
    """flash_attn_func(causal=True) on [B, S, H, D] K/V with the prefix concatenated in front."""
    from flash_attn import flash_attn_func

    batch = q.shape[0]
    keys = torch.cat([_expand_prefix(prefix_k.transpose(0, 1), batch), k.transpose(1, 2)], dim=1)
    values = torch.cat([_expand_prefix(prefix_v.transpose(0, 1), batch), v.transpose(1, 2)], dim=1)
    out = flash_attn_func(q.transpose(1, 2), keys, values, causal=True)
    return out.transpose(1, 2)


def _need_cuda(device: torch.device, dtype: torch.dtype) -> str | None:
    return None if device.type == "cuda" else "benchmarked on CUDA only"


def _flex_available(device, dtype):
    reason = _need_cuda(device, dtype)
    if reason:
        return reason
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as exc:
        return f"torch.nn.attention.flex_attention unavailable: {exc}"
    return None


def _flash_available(device, dtype):
    reason = _need_cuda(device, dtype)
    if reason:
        return reason
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # noqa: BLE001 -- ImportError, or a build that does not match this torch
        return f"flash_attn not importable: {type(exc).__name__}: {str(exc)[:200]}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attn supports fp16/bf16 only, not {str(dtype).replace('torch.', '')}"
    return None


@dataclass(frozen=True)
class Provider:
    """An implementation to time. ``fn(q, k, v, prefix_k, prefix_v) -> out [B, Hq, N, D]``;
    ``uses_prefix`` False: checked against the reference with an empty prefix (the floor);
    ``unavailable(device, dtype)`` returns why it cannot run there, or None. ``windowed``: fn also
    takes ``window=W`` (a sliding window); without it, shapes with a window are skipped, the
    reason ``no_window`` (default: it takes no window)."""

    name: str
    fn: Callable
    uses_prefix: bool = True
    unavailable: Callable[[torch.device, torch.dtype], str | None] | None = field(default=None, compare=False)
    description: str = ""
    windowed: bool = False
    no_window: str = ""

    def why_unavailable(self, device: torch.device, dtype: torch.dtype, window: int | None = None) -> str | None:
        """Why this provider cannot run on device/dtype (or with the sliding window), or None."""
        reason = self.unavailable(device, dtype) if self.unavailable else None
        if reason is None and window is not None and not self.windowed:
            reason = f"not applicable with a sliding window: {self.no_window or f'{self.name} takes no window'}"
        return reason

    def call(self, inputs, window: int | None = None):
        """fn(q, k, v, prefix_k, prefix_v) -- with ``window=W`` when there is a window."""
        return self.fn(*inputs) if window is None else self.fn(*inputs, window=window)


FLASH_NO_WINDOW = ("flash-attn's window_size=(W-1, 0) on the concatenated K/V would also hide the prefix "
                   "columns, which must stay visible to every query")

PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("ours", ours, description="prefix_attention (Triton on CUDA, C++ op on CPU)", windowed=True),
    Provider("peft_style", peft_style, description="expand + cat + repeat_kv + explicit mask + SDPA",
             windowed=True),
    Provider("cat_sdpa", concat_sdpa, description="cat + SDPA with causal_lower_right (window: explicit mask)",
             windowed=True),
    Provider("sdpa_no_prefix", sdpa_no_prefix, uses_prefix=False, windowed=True,
             description="SDPA without a prefix (floor; window: explicit mask)"),
    Provider("flex_attention", flex_attention_cat, unavailable=_flex_available, windowed=True,
             description="cat + compiled FlexAttention, prefix-visible mask_mod"),
    Provider("flash_attn", flash_attn_cat, unavailable=_flash_available, no_window=FLASH_NO_WINDOW,
             description="cat + flash_attn_func(causal=True)"),
)}
# by name only (not in the default "all"): the shared-prefix decode comparison
EXTRA_PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("ours_prefix_in_cache", ours_prefix_in_cache,
             description="ours, the prefix copied into every row's KV cache (same FLOPs, B x the prefix bytes)",
             no_window="the prefix in the cache would fall under the window"),
    Provider("ours_no_cascade", ours_no_cascade, windowed=True,
             description="ours with the shared-prefix cascade off (the per-row path)"),
)}
# names used by the earlier scripts
ALIASES = {"peft": "peft_style", "concat": "cat_sdpa", "cat+sdpa(lower_right)": "cat_sdpa", "floor": "sdpa_no_prefix",
           "sdpa_no_prefix(floor)": "sdpa_no_prefix", "flex": "flex_attention", "fa2": "flash_attn",
           "flash": "flash_attn"}
FLOOR = "sdpa_no_prefix"


def resolve_providers(providers: Iterable[str | Provider] | str | None) -> list[Provider]:
    """Provider objects from names (comma-separated string or list; aliases and the names of
    :data:`EXTRA_PROVIDERS` accepted) or Provider instances; None: all of :data:`PROVIDERS`."""
    if providers is None:
        return list(PROVIDERS.values())
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    out: list[Provider] = []
    for p in providers:
        if isinstance(p, str):
            name = ALIASES.get(p, p)
            known = {**PROVIDERS, **EXTRA_PROVIDERS}
            if name not in known:
                raise ValueError(f"unknown provider {p!r}; choose from {', '.join(known)}")
            p = known[name]
        if p.name in [x.name for x in out]:
            continue
        out.append(p)
    return out

