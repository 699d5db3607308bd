"""Plain-PyTorch prefix attention: the ground truth for tests and benchmarks, and the CPU fallback.

It does what PEFT does in spirit -- concatenate the prefix in front of the sequence keys/values,
repeat K/V heads for GQA and build an explicit [N, P + M] mask -- so it costs O(B * Hq * N * (P + M))
memory. It is written for clarity, not speed. With ``upcast=True`` (the default) it computes in fp32
(or fp64 for fp64 inputs) and casts the output back to the input dtype.

The score of query i and key j, in this order (the order of transformers' eager attention):

1. ``s = scale * q_i . k_j``;
2. ``softcap=c``: ``s = c * tanh(s / c)``;
3. additive terms, after the softcap (Gemma 2 and T5 add their mask / bias to the capped scores):
   ``score_bias`` / ``prefix_score_bias`` (T5's relative bias, any model's materialized bias) and
   ``alibi_slopes`` (BLOOM's ALiBi);
4. masking: a key the query does not see (padding, causality, ``sliding_window``, ``chunk_size``,
   ``document_ids``) gets -inf. The prefix is visible to every query under every term;
5. softmax over the prefix, the visible sequence keys and the ``sinks`` logit.

Positions. Sequence key j of row b has a *token position*: the number of visible
(``key_padding_mask``) keys of its document before it (``document_ids``; the whole row without
them). With left or right padding and no holes this is its index minus the row's (document's)
leading padding, so a left- and a right-padded batch get the same answer. ALiBi and chunking use
it (:func:`token_positions`); causality and sliding windows use the key index, as before. The queries
are the last N of the M sequence positions.

T5's relative bias (design). A kernel does not read T5's materialized [1, Hq, N, M] bias: at
N = M = 4096 transformers' ``compute_bias`` keeps 512 MiB (8 heads, t5-small) / 1 GiB (16 heads,
t5-large) in fp32 and peaks at +783 MiB / +1.26 GiB while building it, per stack and forward
(benchmarks/bias_memory.py, results/bias_memory_cpu.json). It computes the bias from the table
[num_buckets, Hq] (1 / 2 KiB), as :func:`t5_relative_bias` does -- but not T5's fp32 log in-kernel:
the log's rounding decides the bucket at the boundaries (a log one ulp low moves distances 16, 32
and 64 of the bidirectional 32-bucket table), so the kernel gathers ``bias[h, k - q]`` from the
per-distance rows ``table[t5_relative_bucket(d), h]`` for d in -(P + N - 1)..M - 1, built once per
forward with torch's own log: O(Hq * (P + N + M)) floats, 256 / 512 KiB at 4096, exact. The
prefix's bias is the same rows (its keys at positions 0..P-1). ``score_bias`` stays the general
term for any other bias (read tile by tile, broadcast over stride-0 dims).
"""

from __future__ import annotations

import math

import torch


def select_prefix(prefix: torch.Tensor, prefix_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Per-row prefix [B, Hkv, P, D] from a [Hkv, P, D] or [T, Hkv, P, D] prefix (and prefix_ids)."""
    if prefix.dim() == 3:
        prefix = prefix.unsqueeze(0)
    if prefix_ids is None:
        return prefix[:1].expand(batch, *prefix.shape[1:])
    return prefix[prefix_ids.long()]


# ---------------------------------------------------------------- documents and positions

def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document ids [B, M] (0, 1, ... per row) of packed rows whose ``position_ids`` [B, M] restart:
    a new document starts wherever a position is not its predecessor's + 1 (transformers' rule,
    ``masking_utils.find_packed_sequence_indices``)."""
    if position_ids.dim() != 2 or position_ids.is_floating_point():
        raise ValueError(f"position_ids: expected an integer [B, M] tensor, got shape "
                         f"{tuple(position_ids.shape)} dtype {position_ids.dtype}")
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).long().cumsum(-1)


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, n_tokens: int | None = None) -> torch.Tensor:
    """Document ids [1, T] of a varlen pack given flash-attention's ``cu_seqlens`` [n_docs + 1]
    (0 = cu_seqlens[0] <= ... <= cu_seqlens[-1]; document d holds tokens cu_seqlens[d]:cu_seqlens[d+1]).
    ``n_tokens`` (default cu_seqlens[-1]): tokens past cu_seqlens[-1] get the id n_docs."""
    cu = cu_seqlens.long()
    if (cu.dim() != 1 or cu.numel() < 1 or cu_seqlens.is_floating_point() or cu[0].item() != 0
            or bool((cu.diff() < 0).any())):
        raise ValueError(f"cu_seqlens: expected a non-decreasing integer [n_docs + 1] tensor starting at 0, "
                         f"got shape {tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}")
    n_tokens = int(cu[-1]) if n_tokens is None else n_tokens
    tokens = torch.arange(n_tokens, device=cu.device)
    return (torch.searchsorted(cu[1:], tokens, right=True)).unsqueeze(0)


def token_positions(
    batch: int, n_keys: int, *, key_padding_mask: torch.Tensor | None, document_ids: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, offset), both [B, M] int64, for every sequence key j:

    ``count``: visible keys of j's document before j (BLOOM's ``cumsum(mask) - 1`` on real tokens:
    ALiBi's position); ``offset``: j minus the index of its document's first visible key (Llama 4's
    ``index - left padding``: the chunk position; M - j when the document has no visible key). The
    two agree on every visible key of a row without holes in its padding."""
    visible = (torch.ones(batch, n_keys, dtype=torch.bool, device=device) if key_padding_mask is None
               else key_padding_mask.bool().expand(batch, n_keys))
    if document_ids is None:
        same = torch.ones(batch, n_keys, n_keys, dtype=torch.bool, device=device)
    else:
        same = document_ids[:, :, None] == document_ids[:, None, :]
    idx = torch.arange(n_keys, device=device)
    member = same & visible[:, None, :]  # [b, j, k]: k is a visible key of j's document
    count = (member & (idx[None, :] < idx[:, None])).sum(-1)
    if n_keys == 0:  # argmax needs a non-empty dim
        return count, count
    first = torch.where(member.any(-1), member.int().argmax(-1), torch.full_like(count, n_keys))
    return count, idx - first


# ---------------------------------------------------------------- T5's relative position bias

def t5_relative_bucket(relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int,
                       max_distance: int) -> torch.Tensor:
    """T5's bucket (int64) of ``relative_position`` = key position - query position: exact buckets
    for small distances, log-spaced ones up to ``max_distance``, the last bucket beyond; with
    ``bidirectional`` half the buckets for keys after the query, else those keys share bucket 0. The
    log runs in fp32 as in T5 (its rounding decides the bucket at the boundaries)."""
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


def t5_relative_bias(
    table: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor, *, bidirectional: bool,
    num_buckets: int | None = None, max_distance: int = 128,
) -> torch.Tensor:
    """T5's position bias from its ``relative_attention_bias`` table [num_buckets, H]: [1, H, N, M]
    for query / key positions [N] / [M], or [B, H, N, M] for [B, N] / [B, M] (positions restarting
    per document): the bias a kernel computes from the table (through per-distance rows, see the
    module docstring). PEFT's cached prefix: keys 0..P-1 are the prefix, the queries sit at P + their
    index. Differentiable with respect to ``table``."""
    num_buckets = table.shape[0] if num_buckets is None else num_buckets
    if table.dim() != 2 or table.shape[0] != num_buckets:
        raise ValueError(f"table: expected [num_buckets={num_buckets}, H], got shape {tuple(table.shape)}")
    q = query_positions.long().reshape(-1, query_positions.shape[-1])
    k = key_positions.long().reshape(-1, key_positions.shape[-1])
    bucket = t5_relative_bucket(k[:, None, :] - q[:, :, None], bidirectional=bidirectional,
                                num_buckets=num_buckets, max_distance=max_distance)
    return table[bucket].permute(0, 3, 1, 2)


# ---------------------------------------------------------------- visibility and bias

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
    chunk_size: int | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [B, 1, N, P + M] mask, True = visible. Queries are the last N of the M positions.

    ``sliding_window=W``: the query at position i sees sequence key j only if i - W < j (and j <= i
    when causal; |i - j| < W when not causal). ``chunk_size=C`` (Llama 4's ``attention_chunk_size``):
    only keys whose chunk (token offset // C, see :func:`token_positions`; chunks restart per
    document) is the query's (causally when causal). ``document_ids`` [B, M] (packed rows): only keys
    of the query's own document. The prefix stays visible to every query -- under a chunk too, where
    PEFT's cached prefix would instead sit at positions 0..P-1 of chunk 0."""
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
    if document_ids is not None:
        docs = document_ids.expand(batch, n_keys)
        visible = visible & (docs[:, None, n_keys - n_queries:, None] == docs[:, None, None, :])
    if chunk_size is not None:
        _, offset = token_positions(batch, n_keys, key_padding_mask=key_padding_mask,
                                    document_ids=document_ids, device=device)
        chunk = torch.div(offset, chunk_size, rounding_mode="floor")
        visible = visible & (chunk[:, None, n_keys - n_queries:, None] == chunk[:, None, None, :])
    prefix_visible = torch.ones(batch, 1, n_queries, n_prefix, dtype=torch.bool, device=device)
    return torch.cat([prefix_visible, visible], dim=-1)


def _check_term(name: str, tensor: torch.Tensor | None, expected: tuple, *, floating: bool) -> None:
    """ValueError naming ``name`` unless ``tensor`` is None or matches ``expected`` (an int: that
    size; a pair (1, n): 1 or n) with a floating (or integer) dtype."""
    if tensor is None:
        return
    sizes_ok = tensor.dim() == len(expected) and all(
        s in e if isinstance(e, tuple) else s == e for s, e in zip(tensor.shape, expected))
    if not sizes_ok or tensor.is_floating_point() != floating:
        want = ", ".join("|".join(map(str, e)) if isinstance(e, tuple) else str(e) for e in expected)
        kind = "floating" if floating else "integer"
        raise ValueError(f"{name}: expected a {kind} [{want}] tensor, got shape {tuple(tensor.shape)} "
                         f"dtype {tensor.dtype} on {tensor.device}")


def _check_terms(score_bias, prefix_score_bias, alibi_slopes, chunk_size, document_ids,
                 batch, n_heads, n_queries, n_keys, n_prefix) -> None:
    b, h = (1, batch), (1, n_heads)
    _check_term("score_bias", score_bias, (b, h, n_queries, n_keys), floating=True)
    _check_term("prefix_score_bias", prefix_score_bias, (b, h, n_queries, n_prefix), floating=True)
    _check_term("alibi_slopes", alibi_slopes, (n_heads,), floating=True)
    _check_term("document_ids", document_ids, (b, n_keys), floating=False)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")


def _additive_bias(
    score_bias, prefix_score_bias, alibi_slopes, *, batch, n_heads, n_queries, n_keys, n_prefix,
    key_padding_mask, document_ids, dtype, device,
) -> torch.Tensor | None:
    """The sum of the additive terms, broadcastable to the [B, Hq, N, P + M] scores (None: none).

    ALiBi: ``slope_h * position`` of the key -- the prefix at 0..P-1, sequence key j at P + its token
    count (:func:`token_positions`): BLOOM's ``build_alibi_tensor`` over PEFT's ``[ones(P), mask]``
    attention mask. It does not depend on the query: it equals ALiBi's ``-slope * (i - j)`` up to a
    constant per query, which the softmax ignores."""
    bias = None
    if score_bias is not None or prefix_score_bias is not None:
        seq = score_bias if score_bias is not None else torch.zeros(1, 1, n_queries, n_keys, device=device)
        pre = (prefix_score_bias if prefix_score_bias is not None
               else torch.zeros(1, 1, n_queries, n_prefix, device=device))
        shape = (max(seq.shape[0], pre.shape[0]), max(seq.shape[1], pre.shape[1]), n_queries)
        bias = torch.cat([pre.to(dtype).expand(*shape, n_prefix), seq.to(dtype).expand(*shape, n_keys)], -1)
    if alibi_slopes is not None:
        count, _ = token_positions(batch, n_keys, key_padding_mask=key_padding_mask,
                                   document_ids=document_ids, device=device)
        positions = torch.cat([torch.arange(n_prefix, device=device).expand(batch, n_prefix),
                               n_prefix + count], dim=-1).to(dtype)
        alibi = alibi_slopes.to(dtype)[None, :, None, None] * positions[:, None, None, :]
        bias = alibi if bias is None else bias + alibi
    return bias


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
    score_bias: torch.Tensor | None = None,
    prefix_score_bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    chunk_size: int | None = None,
    document_ids: torch.Tensor | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B, Hq, N, Dv] in q's dtype, lse [B, Hq, N] fp32 natural log).

    v / prefix_v may have a head dim Dv of their own. ``sliding_window``, ``chunk_size``,
    ``document_ids``: see visibility_mask. ``softcap=c``: every score s (prefix and sequence, after
    scaling) becomes c * tanh(s / c). ``sinks`` [Hq]: one extra logit per query head in every softmax
    denominator, with no value (gpt-oss); lse includes it. ``score_bias`` [1|B, 1|Hq, N, M] and
    ``prefix_score_bias`` [1|B, 1|Hq, N, P]: added to the sequence / prefix scores after the softcap
    (the other one defaults to 0). ``alibi_slopes`` [Hq]: see _additive_bias. The order of the terms
    is in the module docstring. Differentiable with respect to every tensor input (sinks, biases and
    slopes too). A query that sees no key gets out = 0, lse = -inf (its sink, with sinks) and zero
    gradients.
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
    _check_terms(score_bias, prefix_score_bias, alibi_slopes, chunk_size, document_ids,
                 batch, n_heads, n_queries, n_keys, n_prefix)
    keys = torch.cat([pk, k], dim=2).to(compute_dtype).repeat_interleave(group, dim=1)
    values = torch.cat([pv, v], dim=2).to(compute_dtype).repeat_interleave(group, dim=1)

    scores = torch.matmul(q.to(compute_dtype), keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    bias = _additive_bias(
        score_bias, prefix_score_bias, alibi_slopes, batch=batch, n_heads=n_heads, n_queries=n_queries,
        n_keys=n_keys, n_prefix=n_prefix, key_padding_mask=key_padding_mask, document_ids=document_ids,
        dtype=compute_dtype, device=q.device,
    )
    if bias is not None:
        scores = scores + bias
    visible = visibility_mask(
        n_queries, n_keys, n_prefix, causal=causal, key_padding_mask=key_padding_mask,
        batch=batch, device=q.device, sliding_window=sliding_window, chunk_size=chunk_size,
        document_ids=document_ids,
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
