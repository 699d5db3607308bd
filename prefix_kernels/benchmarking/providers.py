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

A provider that is not available (CPU, package missing, dtype) gives rows with status "skipped"
and the reason in ``error``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from prefix_kernels.functional import prefix_attention

def _expand_prefix(prefix, batch):
    return prefix.unsqueeze(0).expand(batch, -1, -1, -1)


def ours(q, k, v, prefix_k, prefix_v):
    return prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, backend="auto")


def peft_style(q, k, v, prefix_k, prefix_v):
    """expand + cat + repeat_kv + a materialized [B, 1, N, P + M] mask + SDPA."""
    batch, n_heads, n_queries, _ = q.shape
    group = n_heads // k.shape[1]
    keys = torch.cat([_expand_prefix(prefix_k, batch), k], dim=2).repeat_interleave(group, dim=1)
    values = torch.cat([_expand_prefix(prefix_v, batch), v], dim=2).repeat_interleave(group, dim=1)
    n_keys, n_prefix = k.shape[2], prefix_k.shape[1]
    query_pos = torch.arange(n_keys - n_queries, n_keys, device=q.device)
    causal = torch.arange(n_keys, device=q.device)[None, :] <= query_pos[:, None]
    mask = torch.cat([torch.ones(n_queries, n_prefix, dtype=torch.bool, device=q.device), causal], dim=1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.expand(batch, 1, -1, -1))


def concat_sdpa(q, k, v, prefix_k, prefix_v):
    """torch.cat of the prefix + SDPA with bottom-right causal (``causal_lower_right``)."""
    from torch.nn.attention.bias import causal_lower_right

    batch = q.shape[0]
    keys = torch.cat([_expand_prefix(prefix_k, batch), k], dim=2)
    values = torch.cat([_expand_prefix(prefix_v, batch), v], dim=2)
    mask = causal_lower_right(q.shape[2], keys.shape[2])
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def sdpa_no_prefix(q, k, v, prefix_k=None, prefix_v=None):
    """The floor: bottom-right causal SDPA over the sequence keys only."""
    n, m = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if n == m:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if n == 1:  # one query at the last position sees every key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, m), enable_gqa=gqa)


_flex_state: dict = {"compiled": None, "masks": {}}


def prefix_mask_mod(n_prefix: int, offset: int):
    """FlexAttention mask_mod over [prefix | sequence] keys: the prefix columns always visible, the
    sequence bottom-right causal (``offset`` = M - N)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < n_prefix) | (kv_idx - n_prefix <= q_idx + offset)

    return mask_mod


def flex_attention_cat(q, k, v, prefix_k, prefix_v):
    """torch.cat + compiled FlexAttention with :func:`prefix_mask_mod` (block mask cached per shape)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex_state["compiled"] is None:
        try:  # every shape and grad mode is a recompile; the default limit (8) would fall back to eager
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        except AttributeError:  # older torch
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        _flex_state["compiled"] = torch.compile(flex_attention, dynamic=False)
    batch, n_prefix, n, m = q.shape[0], prefix_k.shape[1], q.shape[2], k.shape[2]
    key = (n, m, n_prefix, str(q.device))
    block_mask = _flex_state["masks"].get(key)
    if block_mask is None:
        block_mask = create_block_mask(prefix_mask_mod(n_prefix, m - n), None, None, n, n_prefix + m,
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
    ``unavailable(device, dtype)`` returns why it cannot run there, or None."""

    name: str
    fn: Callable
    uses_prefix: bool = True
    unavailable: Callable[[torch.device, torch.dtype], str | None] | None = field(default=None, compare=False)
    description: str = ""

    def why_unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return self.unavailable(device, dtype) if self.unavailable else None


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("ours", ours, description="prefix_attention (Triton on CUDA, C++ op on CPU)"),
    Provider("peft_style", peft_style, description="expand + cat + repeat_kv + explicit mask + SDPA"),
    Provider("cat_sdpa", concat_sdpa, description="cat + SDPA with causal_lower_right"),
    Provider("sdpa_no_prefix", sdpa_no_prefix, uses_prefix=False, description="SDPA without a prefix (floor)"),
    Provider("flex_attention", flex_attention_cat, unavailable=_flex_available,
             description="cat + compiled FlexAttention, prefix-visible mask_mod"),
    Provider("flash_attn", flash_attn_cat, unavailable=_flash_available,
             description="cat + flash_attn_func(causal=True)"),
)}
# names used by the earlier scripts
ALIASES = {"peft": "peft_style", "concat": "cat_sdpa", "cat+sdpa(lower_right)": "cat_sdpa", "floor": "sdpa_no_prefix",
           "sdpa_no_prefix(floor)": "sdpa_no_prefix", "flex": "flex_attention", "fa2": "flash_attn",
           "flash": "flash_attn"}
FLOOR = "sdpa_no_prefix"


def resolve_providers(providers: Iterable[str | Provider] | str | None) -> list[Provider]:
    """Provider objects from names (comma-separated string or list; aliases accepted) or Provider
    instances; None: all of :data:`PROVIDERS`."""
    if providers is None:
        return list(PROVIDERS.values())
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    out: list[Provider] = []
    for p in providers:
        if isinstance(p, str):
            name = ALIASES.get(p, p)
            if name not in PROVIDERS:
                raise ValueError(f"unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
            p = PROVIDERS[name]
        if p.name in [x.name for x in out]:
            continue
        out.append(p)
    return out

