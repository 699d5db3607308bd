"""Plain-PyTorch prefix attention: the ground truth for tests and benchmarks, and the CPU fallback.

It does what PEFT does in spirit -- concatenate the prefix in front of the sequence keys/values,
repeat K/V heads for GQA and build an explicit [N, P + M] mask -- so it costs O(B * Hq * N * (P + M))
memory. It is written for clarity, not speed. With ``upcast=True`` (the default) it computes in fp32
(or fp64 for fp64 inputs) and casts the output back to the input dtype.
"""

from __future__ import annotations

import torch


def select_prefix(prefix: torch.Tensor, prefix_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Per-row prefix [B, Hkv, P, D] from a [Hkv, P, D] or [T, Hkv, P, D] prefix (and prefix_ids)."""
    if prefix.dim() == 3:
        prefix = prefix.unsqueeze(0)
    if prefix_ids is None:
        return prefix[:1].expand(batch, *prefix.shape[1:])
    return prefix[prefix_ids.long()]


def visibility_mask(
    n_queries: int,
    n_keys: int,
    n_prefix: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    device: torch.device,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Boolean [B, 1, N, P + M] mask, True = visible. Queries are the last N of the M positions.

    ``sliding_window=W``: the query at position i sees sequence key j only if i - W < j (and j <= i
    when causal; |i - j| < W when not causal). The prefix stays visible to every query."""
    query_pos = torch.arange(n_queries, device=device)[:, None] + (n_keys - n_queries)
    key_pos = torch.arange(n_keys, device=device)[None, :]
    visible = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
    if causal:
        visible = key_pos <= query_pos
    if sliding_window is not None:
        visible = visible & (key_pos > query_pos - sliding_window)
        if not causal:
            visible = visible & (key_pos < query_pos + sliding_window)
    visible = visible.expand(batch, 1, n_queries, n_keys)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.bool()[:, None, None, :]
    prefix_visible = torch.ones(batch, 1, n_queries, n_prefix, dtype=torch.bool, device=device)
    return torch.cat([prefix_visible, visible], dim=-1)


def prefix_attention_reference(
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
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B, Hq, N, Dv] in q's dtype, lse [B, Hq, N] fp32 natural log).

    v / prefix_v may have a head dim Dv of their own. ``sliding_window``: see visibility_mask.
    ``softcap=c``: every score s (prefix and sequence, after scaling) becomes c * tanh(s / c).
    ``sinks`` [Hq]: one extra logit per query head in every softmax denominator, with no value
    (gpt-oss); lse includes it. Differentiable with respect to every tensor input (sinks too). A
    query that sees no key gets out = 0, lse = -inf (its sink, with sinks) and zero gradients.
    """
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    compute_dtype = q.dtype
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        compute_dtype = torch.float32

    pk = select_prefix(prefix_k, prefix_ids, batch)
    pv = select_prefix(prefix_v, prefix_ids, batch)
    n_prefix = pk.shape[2]
    keys = torch.cat([pk, k], dim=2).to(compute_dtype).repeat_interleave(group, dim=1)
    values = torch.cat([pv, v], dim=2).to(compute_dtype).repeat_interleave(group, dim=1)

    scores = torch.matmul(q.to(compute_dtype), keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = visibility_mask(
        n_queries, n_keys, n_prefix, causal=causal, key_padding_mask=key_padding_mask,
        batch=batch, device=q.device, sliding_window=sliding_window,
    )
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:  # the sink column joins the softmax, then is dropped (it has no value)
        sink_col = sinks.to(compute_dtype)[None, :, None, None].expand(batch, n_heads, n_queries, 1)
        scores = torch.cat([scores, sink_col], dim=-1)
    # Softmax that stays finite for rows with no visible key: exp(-inf - 0) = 0, sum = 0 -> out = 0.
    if scores.shape[-1] == 0:  # no key at all (P = M = 0): amax is undefined, every row is empty
        row_max = scores.new_zeros(*scores.shape[:-1], 1)
    else:
        row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom == 0, torch.ones_like(denom), denom)
    if sinks is not None:
        probs = probs[..., :-1]
    out = torch.matmul(probs, values)
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return out.to(q.dtype), lse.float()
