"""The reference's score and mask terms -- score bias, ALiBi, chunked attention, packed documents --
against constructions that share none of prefix_kernels/reference.py's code:

- transformers' own modules on tiny random configs: T5Attention (its relative buckets, with PEFT's
  prefix in the cache, encoder and decoder), BLOOM (ALiBi with a cached prefix, left and right
  padding), Llama 4's chunked mask, the packed-sequence mask from restarting position_ids;
- a naive loop (one softmax per query, each rule written out) for every term alone and combined with
  padding, windows, softcap, sinks, GQA, prefix banks and Dv != D, gradients included;
- properties: packed rows equal the same documents run one by one; left and right padding agree.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from prefix_kernels.reference import (
    document_ids_from_cu_seqlens,
    document_ids_from_position_ids,
    prefix_attention_reference,
    t5_relative_bias,
    t5_relative_bucket,
    visibility_mask,
)

transformers = pytest.importorskip("transformers")
from transformers import masking_utils  # noqa: E402

F64 = torch.float64


def _cache_kwarg(fn) -> str:
    """The name of a forward's cache argument ("cache" from transformers 5.2x, else past_key_values)."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def _close(a, b, atol=1e-10):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ---------------------------------------------------------------- the naive loop

def naive_attention(q, k, v, pk, pv, *, causal=True, scale, mask=None, window=None, softcap=None,
                    sinks=None, bias=None, prefix_bias=None, slopes=None, chunk=None, docs=None):
    """One softmax per (row, head, query), every rule spelled out; pk / pv are per row [B, Hkv, P, D].
    Positions: a token's ALiBi position is P + the kept tokens of its document before it; its chunk
    position is its index minus that of its document's first kept token."""
    B, Hq, N, _ = q.shape
    M, P, G = k.shape[2], pk.shape[2], Hq // k.shape[1]
    rows = []
    for b in range(B):
        keep = [mask is None or bool(mask[b, j]) for j in range(M)]
        doc = [0 if docs is None else int(docs[b, j]) for j in range(M)]
        mates = [[t for t in range(M) if doc[t] == doc[j] and keep[t]] for j in range(M)]
        count = [sum(1 for t in mates[j] if t < j) for j in range(M)]
        offset = [j - (mates[j][0] if mates[j] else M) for j in range(M)]
        heads = []
        for h in range(Hq):
            queries = []
            for i in range(N):
                qi = M - N + i
                logits, vals = [], []

                def score(key, extra):
                    s = (q[b, h, i] * key).sum() * scale
                    if softcap is not None:
                        s = softcap * torch.tanh(s / softcap)
                    return s + extra

                for p in range(P):
                    extra = 0.0
                    if prefix_bias is not None:
                        extra = extra + prefix_bias[min(b, prefix_bias.shape[0] - 1), min(h, prefix_bias.shape[1] - 1), i, p]
                    if slopes is not None:
                        extra = extra + slopes[h] * p
                    logits.append(score(pk[b, h // G, p], extra))
                    vals.append(pv[b, h // G, p])
                for j in range(M):
                    if not keep[j] or (causal and j > qi):
                        continue
                    if window is not None and (j <= qi - window or (not causal and j >= qi + window)):
                        continue
                    if docs is not None and doc[j] != doc[qi]:
                        continue
                    if chunk is not None and offset[j] // chunk != offset[qi] // chunk:
                        continue
                    extra = 0.0
                    if bias is not None:
                        extra = extra + bias[min(b, bias.shape[0] - 1), min(h, bias.shape[1] - 1), i, j]
                    if slopes is not None:
                        extra = extra + slopes[h] * (P + count[j])
                    logits.append(score(k[b, h // G, j], extra))
                    vals.append(v[b, h // G, j])
                if sinks is not None:
                    logits.append(sinks[h])
                    vals.append(torch.zeros_like(v[0, 0, 0]))
                if not vals:
                    queries.append(torch.zeros_like(v[0, 0, 0]))
                    continue
                weights = torch.softmax(torch.stack(logits), 0)
                queries.append((weights[:, None] * torch.stack(vals)).sum(0))
            heads.append(torch.stack(queries))
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def _padding(kind, B, M, gen):
    if kind is None:
        return None
    lengths = torch.randint(1, M + 1, (B,), generator=gen)
    lengths[0] = M // 2
    idx = torch.arange(M)
    if kind == "left":
        return (idx[None, :] >= M - lengths[:, None]).long()
    if kind == "right":
        return (idx[None, :] < lengths[:, None]).long()
    return (torch.rand(B, M, generator=gen) < 0.7).long()  # holes


COMBOS = {
    "bias": dict(bias=True),
    "prefix_bias": dict(prefix_bias=True),
    "alibi": dict(slopes=True),
    "chunk": dict(chunk=3),
    "docs": dict(docs=True),
    "chunk_noncausal": dict(chunk=4, causal=False),
    "docs_noncausal": dict(docs=True, causal=False),
    "all": dict(bias=True, prefix_bias=True, slopes=True, chunk=3, docs=True, window=5, softcap=2.0, sinks=True),
    "all_noncausal": dict(bias=True, slopes=True, chunk=4, docs=True, window=4, causal=False),
}


@pytest.mark.parametrize("padding", [None, "left", "right", "holes"])
@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_terms_match_naive_loop(combo, padding):
    """Each term alone and all together, with GQA (Hq = 4, Hkv = 2), a prefix bank with prefix_ids,
    Dv != D, padding (left, right, with holes) and decode-like N < M; out and the gradients of every
    input including the biases and slopes."""
    c = dict(COMBOS[combo])
    gen = torch.Generator().manual_seed(hash((combo, padding)) % 2**31)
    B, Hq, Hkv, N, M, P, D, Dv, T = 2, 4, 2, 10, 12, 3, 6, 5, 3

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).requires_grad_()

    q, k, v = rand(B, Hq, N, D), rand(B, Hkv, M, D), rand(B, Hkv, M, Dv)
    pk, pv = rand(T, Hkv, P, D), rand(T, Hkv, P, Dv)
    ids = torch.tensor([2, 0])
    mask = _padding(padding, B, M, gen)
    kw = dict(causal=c.get("causal", True), sliding_window=c.get("window"), softcap=c.get("softcap"),
              chunk_size=c.get("chunk"))
    terms = dict(
        score_bias=rand(B, 1, N, M) if c.get("bias") else None,  # per row, broadcast over heads
        prefix_score_bias=rand(1, Hq, N, P) if c.get("prefix_bias") else None,  # broadcast over rows
        alibi_slopes=(torch.rand(Hq, generator=gen, dtype=F64) * 0.5).requires_grad_() if c.get("slopes") else None,
        sinks=rand(Hq) if c.get("sinks") else None,
        document_ids=torch.tensor([[0] * 4 + [1] * 5 + [2] * 3, [3] * 7 + [5] * 5]) if c.get("docs") else None,
    )
    out, _ = prefix_attention_reference(q, k, v, pk, pv, scale=0.4, key_padding_mask=mask, prefix_ids=ids,
                                        **kw, **terms)
    want = naive_attention(q, k, v, pk[ids], pv[ids], scale=0.4, mask=mask, causal=kw["causal"],
                           window=kw["sliding_window"], softcap=kw["softcap"], chunk=kw["chunk_size"],
                           sinks=terms["sinks"], bias=terms["score_bias"], prefix_bias=terms["prefix_score_bias"],
                           slopes=terms["alibi_slopes"], docs=terms["document_ids"])
    _close(out, want)
    inputs = [q, k, v, pk, pv] + [t for t in terms.values() if t is not None and t.requires_grad]
    g = torch.randn(out.shape, generator=gen, dtype=F64)
    got = torch.autograd.grad(out, inputs, g)
    expect = torch.autograd.grad(want, inputs, g)
    for a, b in zip(got, expect):
        _close(a, b)


def test_bias_gradient_against_finite_differences():
    """A bias that requires grad gets its gradient through autograd (and only the visible entries
    move the output)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 3, generator=gen, dtype=F64) for _ in range(3))
    pk, pv = (torch.randn(2, 2, 3, generator=gen, dtype=F64) for _ in range(2))
    bias = torch.randn(1, 2, 4, 4, generator=gen, dtype=F64, requires_grad=True)
    pbias = torch.randn(1, 1, 4, 2, generator=gen, dtype=F64, requires_grad=True)
    slopes = torch.rand(2, generator=gen, dtype=F64, requires_grad=True)

    def f(bias, pbias, slopes):
        return prefix_attention_reference(q, k, v, pk, pv, score_bias=bias, prefix_score_bias=pbias,
                                          alibi_slopes=slopes)[0]

    assert torch.autograd.gradcheck(f, (bias, pbias, slopes))
    (grad,) = torch.autograd.grad((f(bias, pbias, slopes) ** 2).sum(), bias)
    later = torch.ones(4, 4, dtype=torch.bool).triu(1)
    assert (grad[..., later] == 0).all() and (grad[..., ~later] != 0).all()  # causal: masked keys get none


# ---------------------------------------------------------------- T5 relative bias

def _t5_attention(is_decoder, num_buckets=8, max_distance=20):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    config = T5Config(d_model=16, d_kv=4, num_heads=4, relative_attention_num_buckets=num_buckets,
                      relative_attention_max_distance=max_distance, is_decoder=is_decoder, dropout_rate=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return T5Attention(config, has_relative_attention_bias=True, layer_idx=0).double().eval()


def _compute_bias(attn, n_queries, n_keys, past):
    """T5Attention.compute_bias for queries at past..past+N-1 (the argument's name varies by version)."""
    params = inspect.signature(attn.compute_bias).parameters
    if "past_seen_tokens" in params:
        return attn.compute_bias(n_queries, n_keys, past_seen_tokens=past)
    return attn.compute_bias(n_queries, n_keys, cache_position=torch.arange(past, past + n_queries))


@pytest.mark.parametrize("is_decoder", [False, True])
@pytest.mark.parametrize("buckets,max_distance,P,N", [(8, 20, 5, 30), (32, 128, 7, 300)])
def test_t5_relative_bias_matches_compute_bias(is_decoder, buckets, max_distance, P, N):
    """PEFT's layout: keys 0..P+N-1 (prefix first), queries at P..P+N-1; encoder (bidirectional) and
    decoder (causal) buckets, the log-spaced ones included."""
    attn = _t5_attention(is_decoder, buckets, max_distance)
    want = _compute_bias(attn, N, P + N, P)
    got = t5_relative_bias(attn.relative_attention_bias.weight, torch.arange(P, P + N), torch.arange(P + N),
                           bidirectional=not is_decoder, num_buckets=buckets, max_distance=max_distance)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    per_row = t5_relative_bias(attn.relative_attention_bias.weight, torch.arange(P, P + N).expand(2, N),
                               torch.arange(P + N).expand(2, P + N), bidirectional=not is_decoder,
                               max_distance=max_distance)
    torch.testing.assert_close(per_row, want.expand(2, -1, -1, -1), atol=0, rtol=0)
    # the kernel's layout: per-distance rows table[bucket(d), h] for d = k - q in -(P + N - 1)..P + N - 1
    distance = torch.arange(-(P + N - 1), P + N)
    rows = attn.relative_attention_bias.weight[t5_relative_bucket(
        distance, bidirectional=not is_decoder, num_buckets=buckets, max_distance=max_distance)].T
    gathered = rows[:, torch.arange(P + N)[None, :] - torch.arange(P, P + N)[:, None] + (P + N - 1)]
    torch.testing.assert_close(gathered[None], want, atol=0, rtol=0)


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("is_decoder", [False, True])
def test_t5_attention_with_cached_prefix(is_decoder, padding):
    """T5Attention with P prefix keys in its cache (PEFT's path) equals the reference given the bias
    from the table (prefix columns -> prefix_score_bias), and so does the table's gradient."""
    attn = _t5_attention(is_decoder)
    gen = torch.Generator().manual_seed(1)
    B, N, P, H, D = 2, 9, 4, 4, 4
    x = torch.randn(B, N, 16, generator=gen, dtype=F64)
    pk, pv = (torch.randn(B, H, P, D, generator=gen, dtype=F64) for _ in range(2))
    pad = _padding(padding, B, N, gen)
    keep = torch.cat([torch.ones(B, P, dtype=torch.long), pad if pad is not None else torch.ones(B, N, dtype=torch.long)], 1)
    visible = keep.bool()[:, None, None, :].expand(B, 1, N, P + N)
    if is_decoder:
        visible = visible & (torch.arange(P + N)[None, :] <= torch.arange(P, P + N)[:, None])
    additive = torch.zeros(B, 1, N, P + N, dtype=F64).masked_fill(~visible, torch.finfo(F64).min)
    want = attn(x, mask=additive, **{_cache_kwarg(attn.forward): _prefix_cache(pk, pv)})[0]

    table = attn.relative_attention_bias.weight.detach().clone().requires_grad_()
    bias = t5_relative_bias(table, torch.arange(P, P + N), torch.arange(P + N), bidirectional=not is_decoder,
                            max_distance=20)
    q, k, v = (proj(x).view(B, N, H, D).transpose(1, 2) for proj in (attn.q, attn.k, attn.v))
    out, _ = prefix_attention_reference(q, k, v, pk, pv, causal=is_decoder, scale=1.0, key_padding_mask=pad,
                                        prefix_ids=torch.arange(B), score_bias=bias[..., P:],
                                        prefix_score_bias=bias[..., :P])
    got = attn.o(out.transpose(1, 2).reshape(B, N, H * D))
    real = (pad if pad is not None else torch.ones(B, N)).bool()  # padded query rows are not compared
    _close(got[real], want[real])
    got_grad = torch.autograd.grad(got[real].sum(), table)[0]
    want_grad = torch.autograd.grad(want[real].sum(), attn.relative_attention_bias.weight)[0]
    _close(got_grad, want_grad)


def _prefix_cache(pk, pv):
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(pk, pv, 0)
    return cache


# ---------------------------------------------------------------- ALiBi (BLOOM)

def _bloom(n_head=4):
    from transformers import BloomConfig, BloomModel

    config = BloomConfig(vocab_size=40, hidden_size=8 * n_head, n_head=n_head, n_layer=1,
                         hidden_dropout=0.0, attention_dropout=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return BloomModel(config).double().eval()


def _bloom_slopes(n_head):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    return build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n_head, F64).view(n_head, 2)[:, 1]


@pytest.mark.parametrize("n_head", [4, 6])  # 6: BLOOM's slopes for a head count that is not a power of 2
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_bloom_alibi_with_cached_prefix(padding, n_head):
    """A one-layer BLOOM with P prefix keys in its cache and PEFT's [ones(P), mask] attention mask
    equals the reference with BLOOM's slopes, on no, left and right padding."""
    model = _bloom(n_head)
    gen = torch.Generator().manual_seed(2)
    B, N, P, D = 3, 7, 4, 8
    ids = torch.randint(0, 40, (B, N), generator=gen)
    pad = _padding(padding, B, N, gen)
    mask = pad if pad is not None else torch.ones(B, N, dtype=torch.long)
    pk, pv = (torch.randn(B, n_head, P, D, generator=gen, dtype=F64) for _ in range(2))
    seen = {}
    attn = model.h[0].self_attention
    attn.query_key_value.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o))
    attn.dense.register_forward_pre_hook(lambda m, i: seen.__setitem__("ctx", i[0]))
    model(ids, attention_mask=torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1),
          **{_cache_kwarg(model.forward): _prefix_cache(pk, pv)})
    q, k, v = attn._reshape(seen["qkv"])
    out, _ = prefix_attention_reference(q, k, v, pk, pv, prefix_ids=torch.arange(B), key_padding_mask=pad,
                                        alibi_slopes=_bloom_slopes(n_head))
    got = out.transpose(1, 2).reshape(B, N, -1)
    real = mask.bool()
    _close(got[real], seen["ctx"][real], atol=1e-6)  # BLOOM's softmax runs in fp32


@pytest.mark.parametrize("extra", [dict(), dict(chunk_size=3), dict(chunk_size=2, sliding_window=3, softcap=3.0)])
def test_left_and_right_padding_agree(extra):
    """The same rows left- and right-padded give the same output on their real tokens under ALiBi
    and chunking (positions count real tokens)."""
    gen = torch.Generator().manual_seed(3)
    B, H, M, P, D = 3, 2, 9, 2, 4
    lengths = [9, 5, 3]
    rows = [torch.randn(3, H, L, D, generator=gen, dtype=F64) for L in lengths]
    pk, pv = (torch.randn(H, P, D, generator=gen, dtype=F64) for _ in range(2))
    slopes = torch.tensor([0.5, 0.125], dtype=F64)
    outs = {}
    for side in ("left", "right"):
        qkv = torch.zeros(3, B, H, M, D, dtype=F64)
        mask = torch.zeros(B, M, dtype=torch.long)
        for b, (row, L) in enumerate(zip(rows, lengths)):
            span = slice(M - L, M) if side == "left" else slice(0, L)
            qkv[:, b, :, span], mask[b, span] = row, 1
        out, _ = prefix_attention_reference(*qkv, pk, pv, key_padding_mask=mask, alibi_slopes=slopes, **extra)
        outs[side] = [out[b, :, M - L:] if side == "left" else out[b, :, :L] for b, L in enumerate(lengths)]
    for left, right in zip(outs["left"], outs["right"]):
        _close(left, right)


# ---------------------------------------------------------------- chunked attention (Llama 4)

def _sdpa_config(**kw):
    from transformers import Llama4TextConfig

    config = Llama4TextConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                              num_hidden_layers=1, intermediate_size=16, vocab_size=32, **kw)
    config._attn_implementation = "sdpa"
    return config


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("past", [0, 5])
def test_chunked_mask_matches_llama4(padding, past):
    """The sequence part of visibility_mask(chunk_size=C) is transformers' create_chunked_causal_mask
    (prefill and with `past` cached tokens: queries are the last N of M), and the reference with a
    prefix equals SDPA over [prefix, keys] with the prefix visible and Llama 4's mask."""
    C, B, N, P, D = 4, 3, 11, 3, 8
    M = past + N
    gen = torch.Generator().manual_seed(4)
    pad = _padding(padding, B, M, gen)
    cache = None
    if past:
        from transformers import DynamicCache

        cache = DynamicCache()
        cache.update(torch.zeros(B, 1, past, D), torch.zeros(B, 1, past, D), 0)
    hf = masking_utils.create_chunked_causal_mask(
        _sdpa_config(attention_chunk_size=C), torch.zeros(B, N, 16), pad, cache, allow_is_causal_skip=False)
    ours = visibility_mask(N, M, P, causal=True, key_padding_mask=pad, batch=B, device=torch.device("cpu"),
                           chunk_size=C)
    assert torch.equal(ours[..., P:], hf.expand(B, 1, N, M))
    assert ours[..., :P].all()

    q = torch.randn(B, 2, N, D, generator=gen, dtype=F64)
    k, v = (torch.randn(B, 1, M, D, generator=gen, dtype=F64) for _ in range(2))
    pk, pv = (torch.randn(1, P, D, generator=gen, dtype=F64) for _ in range(2))
    full = torch.cat([torch.ones(B, 1, N, P, dtype=torch.bool), hf.expand(B, 1, N, M)], -1)
    keys, vals = (torch.cat([p.expand(B, 1, P, D), s], 2).expand(B, 2, P + M, D) for p, s in ((pk, k), (pv, v)))
    want = F.scaled_dot_product_attention(q, keys, vals, attn_mask=full)
    out, _ = prefix_attention_reference(q, k, v, pk, pv, key_padding_mask=pad, chunk_size=C)
    _close(out, want)


# ---------------------------------------------------------------- packed documents

def test_document_ids_helpers():
    """position_ids restarting -> transformers' find_packed_sequence_indices; cu_seqlens -> the same
    ids as writing them out."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    ids = document_ids_from_position_ids(pos)
    assert torch.equal(ids, masking_utils.find_packed_sequence_indices(pos))
    assert torch.equal(ids[0], torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3]))
    cu = torch.tensor([0, 3, 5, 9, 10], dtype=torch.int32)
    assert torch.equal(document_ids_from_cu_seqlens(cu), ids[:1])
    assert torch.equal(document_ids_from_cu_seqlens(cu, 12), torch.cat([ids[:1], torch.tensor([[4, 4]])], 1))
    with pytest.raises(ValueError, match="cu_seqlens"):
        document_ids_from_cu_seqlens(torch.tensor([1, 3]))


def test_packed_mask_matches_transformers():
    """visibility_mask(document_ids=...) is the mask transformers builds from packed position_ids."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    hf = masking_utils.create_causal_mask(_sdpa_config(), torch.zeros(2, 10, 16), None, None,
                                          position_ids=pos, allow_is_causal_skip=False)
    ours = visibility_mask(10, 10, 2, causal=True, key_padding_mask=None, batch=2, device=torch.device("cpu"),
                           document_ids=document_ids_from_position_ids(pos))
    assert torch.equal(ours[..., 2:], hf)


@pytest.mark.parametrize("extra", [
    dict(), dict(alibi=True), dict(chunk_size=3), dict(sliding_window=3),
    dict(alibi=True, chunk_size=2, sliding_window=4, softcap=2.0, sinks=True, bias=True),
])
def test_packed_equals_unpacked(extra):
    """A packed row (documents of 4, 6 and 3 tokens, then 2 padding tokens) equals each document run
    alone with the row's prefix (a bank entry), GQA and Dv != D: out and the prefix's gradients."""
    extra = dict(extra)
    gen = torch.Generator().manual_seed(5)
    Hq, Hkv, P, D, Dv, lengths = 4, 2, 3, 5, 7, [4, 6, 3]
    M = sum(lengths) + 2
    q = torch.randn(1, Hq, M, D, generator=gen, dtype=F64)
    k = torch.randn(1, Hkv, M, D, generator=gen, dtype=F64)
    v = torch.randn(1, Hkv, M, Dv, generator=gen, dtype=F64)
    pk = torch.randn(2, Hkv, P, D, generator=gen, dtype=F64, requires_grad=True)
    pv = torch.randn(2, Hkv, P, Dv, generator=gen, dtype=F64, requires_grad=True)
    bias = torch.randn(1, Hq, M, M, generator=gen, dtype=F64) if extra.pop("bias", False) else None
    terms = dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=F64) if extra.pop("alibi", False) else None,
                 sinks=torch.randn(Hq, generator=gen, dtype=F64) if extra.pop("sinks", False) else None, **extra)
    docs = torch.tensor([sum([[d] * L for d, L in enumerate(lengths)], []) + [9, 9]])
    mask = (torch.arange(M) < sum(lengths)).long()[None]
    ids = torch.tensor([1])
    packed, _ = prefix_attention_reference(q, k, v, pk, pv, prefix_ids=ids, key_padding_mask=mask, document_ids=docs,
                                           score_bias=bias, **terms)
    g = torch.randn(packed.shape, generator=gen, dtype=F64)
    packed_grads = torch.autograd.grad((packed[..., :sum(lengths), :] * g[..., :sum(lengths), :]).sum(), (pk, pv))
    start, pieces, loss = 0, [], 0
    for L in lengths:
        span = slice(start, start + L)
        out, _ = prefix_attention_reference(q[:, :, span], k[:, :, span], v[:, :, span], pk, pv, prefix_ids=ids,
                                            score_bias=None if bias is None else bias[..., span, span], **terms)
        pieces.append(out)
        loss = loss + (out * g[:, :, span]).sum()
        start += L
    _close(packed[:, :, :sum(lengths)], torch.cat(pieces, 2))
    for a, b in zip(packed_grads, torch.autograd.grad(loss, (pk, pv))):
        _close(a, b)


# ---------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("name,value,match", [
    ("score_bias", torch.zeros(2, 2, 4, 5), r"score_bias: expected a floating \[1\|2, 1\|2, 4, 6\]"),
    ("prefix_score_bias", torch.zeros(1, 3, 4, 3), r"prefix_score_bias: .*\[1\|2, 1\|2, 4, 3\]"),
    ("alibi_slopes", torch.zeros(3), r"alibi_slopes: .*\[2\]"),
    ("alibi_slopes", torch.zeros(2, dtype=torch.long), r"alibi_slopes: expected a floating"),
    ("document_ids", torch.zeros(2, 6), r"document_ids: expected a integer"),
    ("chunk_size", 0, r"chunk_size: expected a positive int"),
])
def test_bad_terms_are_refused(name, value, match):
    q = torch.zeros(2, 2, 4, 8)
    k = torch.zeros(2, 1, 6, 8)
    pk = torch.zeros(1, 3, 8)
    with pytest.raises(ValueError, match=match):
        prefix_attention_reference(q, k, k, pk, pk, **{name: value})


def test_unset_terms_change_nothing():
    """The new arguments at their defaults are today's reference, bit for bit; zero biases and
    slopes, a chunk as long as M and a single document change nothing either."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=gen) for _ in range(3))
    pk, pv = (torch.randn(2, 3, 4, generator=gen) for _ in range(2))
    base = prefix_attention_reference(q, k, v, pk, pv)
    same = prefix_attention_reference(q, k, v, pk, pv, score_bias=None, prefix_score_bias=None, alibi_slopes=None,
                                      chunk_size=None, document_ids=None)
    assert all(torch.equal(a, b) for a, b in zip(base, same))
    neutral = prefix_attention_reference(q, k, v, pk, pv, score_bias=torch.zeros(1, 1, 5, 5),
                                         alibi_slopes=torch.zeros(2), chunk_size=5,
                                         document_ids=torch.zeros(2, 5, dtype=torch.long))
    for a, b in zip(base, neutral):
        torch.testing.assert_close(a, b)
    assert math.isfinite(float(base[1].sum()))
