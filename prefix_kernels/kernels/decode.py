"""Triton split-KV forward for few queries per row ("flash-decoding"): generate() steps, short chunks.

The general forward (kernels/forward.py) runs one program per (block of 64..128 queries, batch
row, query head). With N = 1 that tile is almost all padding, and with GQA each of the
G = Hq / Hkv query heads of a group reads the same K/V again. Here:

Kernel 1, ``prefix_attention_decode_kernel``: one program per (batch row b, kv head g, split s).
Its tile rows are the N * G (query head, query) pairs of kv head g -- row r is query
i = r % N of head h = g * G + r // N -- padded to a power of two >= 16 for tl.dot, so K/V of the
group are read once. The key axis is the concatenation [prefix (P keys) | sequence (M keys)],
cut into ``num_splits`` contiguous ranges of ``keys_per_split`` keys (a multiple of BLOCK_N);
split s walks [s * keys_per_split, (s + 1) * keys_per_split) of it: its part of the prefix
(always visible; prefix t = prefix_ids[b] or 0; full blocks unmasked, a tail block masked to the
range end), then its part of the sequence (blocks that every row may see without a mask, then the
blocks past the causal boundary or the range end with the mask). Masks as in the forward:
key_padding_mask [B, M] (True = attend) and bottom-right causal (query i sits at position
M - N + i and sees sequence keys j <= M - N + i). The walk and the online softmax are the forward's
(``tiles.attend_prefix_and_sequence``): scores in the log2 domain (``qk_scale = scale * log2(e)``), m, l, acc
in fp32. With one split (SPLIT=False) the program finishes the rows itself, exactly like the
forward (out = acc / l, lse = m + log2(l) in log2 units, out 0 / lse -inf for a row that saw no
key). With several it writes, per (row, split), the unnormalized fp32 partials acc [D] and the
pair (m, l) to [B, Hq, N, splits, ...] buffers. It stores m and l rather than lse_s = m + log2(l):
at logits ~1e9 (log2 units) one fp32 ulp of lse_s is 128, so weights 2^(lse_s - lse) rebuilt from
rounded lse_s could be off by 2^(+-64); m_s - max_s m_s is a difference of exact scores.

Kernel 2, ``prefix_attention_decode_combine_kernel``: one program per (b, h, i). With
m = max_s m_s (m_safe = 0 when every split saw nothing, m = -inf), w_s = 2^(m_s - m_safe),
l = sum_s w_s l_s, out = sum_s w_s acc_s / l and lse = m + log2(l) in log2 units (the contract of
ops.prefix_attention_forward; the backward recomputes P = exp2(s - lse) from it). A split that saw
no key has m_s = -inf, l_s = 0, acc_s = 0, so w_s = 0; a row whose splits all saw nothing gets
out = 0, lse = -inf. NaN propagates: a NaN score makes its split's l_s (and acc_s) NaN, hence l,
out and lse NaN, as in the general kernel.

Kernel 3, ``prefix_attention_shared_prefix_kernel`` (the cascade of Hydragen / FlashInfer, for one
prefix shared by every row): the prefix part as one product of all rows' queries against the prefix,
per kv head and prefix split, written as the first splits of the partials; kernel 1 then walks only
the sequence keys (``split_base`` past the prefix's splits) and the combine merges both. With a bank
(prefix_ids, T prefixes) the same per (prefix, kv head, split) over the rows that use that prefix,
which each program finds by scanning prefix_ids on the device (``bank_rows``: no sort, no host sync).

Block configs (``decode_config``), the split count (``decode_num_splits``), when a call takes
this path (``use_decode_kernel``) and when the cascade (``use_shared_prefix_decode``) are the
launch policy in kernels/configs.py.

Written for sm_80/sm_90 (compile-checked for both in the tests) and the CPU interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl

from prefix_kernels.kernels.tiles import attend_prefix, attend_prefix_and_sequence, finish_rows, load_tile, sink_logit2


@triton.jit
def start_rows(SINKS, row_h, row_ok, split, BLOCK_R: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
               HAS_SINKS: tl.constexpr):
    """The online-softmax state (m, l, acc) a split starts from: empty, or on split 0 each row's sink
    logit (max = sink, sum = 1), so the combine counts every sink once."""
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM_V_PAD], dtype=tl.float32)
    if HAS_SINKS:
        if split == 0:
            m_i = sink_logit2(SINKS, row_h, row_ok, tl.float32)
            l_i = l_i + 1.0
    return m_i, l_i, acc


@triton.jit
def store_partials(M_PART, L_PART, ACC_PART, part, m_i, l_i, acc, row_ok, offs_dv, HEAD_DIM_V: tl.constexpr):
    """A split's unnormalized partials of its rows at ``part`` (row * num_splits + split), for the combine."""
    tl.store(M_PART + part, m_i, mask=row_ok)
    tl.store(L_PART + part, l_i, mask=row_ok)
    a_ptrs = ACC_PART + part[:, None] * HEAD_DIM_V + offs_dv[None, :]
    tl.store(a_ptrs, acc, mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def split_ranges(split, keys_per_split, n_prefix, n_keys, seq_start):
    """A split's range of the concatenated [prefix | sequence] key axis (which skips the sequence keys
    before seq_start), as its prefix part [p_lo, p_hi) and its sequence part [s_lo, s_hi) in sequence
    coordinates."""
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_prefix + n_keys - seq_start)
    p_lo = tl.minimum(lo, n_prefix)
    p_hi = tl.minimum(hi, n_prefix)
    s_lo = tl.maximum(lo, n_prefix) - n_prefix + seq_start
    s_hi = tl.maximum(hi, n_prefix) - n_prefix + seq_start
    return p_lo, p_hi, s_lo, s_hi


@triton.jit
def finish_split(Out, LSE, M_PART, L_PART, ACC_PART, out_strides, lse_strides, b, row_h, row_i, row_ok, offs_dv,
                 acc, l_i, m_i, n_heads, n_queries, num_splits, split_base, split, HEAD_DIM_V: tl.constexpr,
                 SPLIT: tl.constexpr):
    """A split's rows: (SPLIT) their partials at split ``split_base + split``, for the combine, else
    out and lse themselves."""
    if SPLIT:
        # Partials [B, Hq, N, num_splits, (D)], contiguous: row (b, h, i) then split.
        part = ((b * n_heads + row_h) * n_queries + row_i) * num_splits + split_base + split
        store_partials(M_PART, L_PART, ACC_PART, part, m_i, l_i, acc, row_ok, offs_dv, HEAD_DIM_V)
    else:
        stride_ob, stride_oh, stride_om, stride_od = out_strides
        stride_lb, stride_lh = lse_strides
        out, lse = finish_rows(acc, l_i, m_i)
        tl.store(LSE + b * stride_lb + row_h * stride_lh + row_i, lse, mask=row_ok)
        o_rows = Out + b * stride_ob + row_h * stride_oh + row_i * stride_om
        tl.store(o_rows[:, None] + offs_dv[None, :] * stride_od, out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def prefix_attention_decode_kernel(
    Q, K, V, PK, PV, PREFIX_IDS, KPM, Out, LSE, ACC_PART, M_PART, L_PART,
    q_strides, k_strides, v_strides, pk_strides, pv_strides, kpm_strides, out_strides, lse_strides,
    n_heads, n_kv_heads, n_queries, n_keys, n_prefix, group, num_splits, keys_per_split, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_PREFIX_IDS: tl.constexpr, SPLIT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, terms, seq_start=0, split_base=0,
):
    stride_qb, stride_qh, stride_qm, stride_qd = q_strides
    stride_kb, stride_kh, stride_kn, stride_kd = k_strides
    stride_vb, stride_vh, stride_vn, stride_vd = v_strides
    stride_pkt, stride_pkh, stride_pkn, stride_pkd = pk_strides
    stride_pvt, stride_pvh, stride_pvn, stride_pvd = pv_strides
    stride_mb, stride_mn = kpm_strides
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b = (bg // n_kv_heads).to(tl.int64)
    g = (bg % n_kv_heads).to(tl.int64)
    t = tl.load(PREFIX_IDS + b).to(tl.int64) if HAS_PREFIX_IDS else 0

    # Tile row r: query i = r % N of query head h = g * G + r // N (rows >= N * G are padding).
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
    n_rows = n_queries * group
    row_i = offs_r % n_queries
    row_h = g * group + offs_r // n_queries  # int64
    q_rows = Q + b * stride_qb + row_h * stride_qh + row_i * stride_qm
    q = load_tile(q_rows[:, None] + offs_d[None, :] * stride_qd, offs_r, n_rows, offs_d,
                  HEAD_DIM, HEAD_DIM_PAD, True, UPCAST)

    m_i, l_i, acc = start_rows(terms.sinks, row_h, offs_r < n_rows, split, BLOCK_R, HEAD_DIM_V_PAD, terms.HAS_SINKS)

    p_lo, p_hi, s_lo, s_hi = split_ranges(split, keys_per_split, n_prefix, n_keys, seq_start)
    acc, l_i, m_i = attend_prefix_and_sequence(
        acc, l_i, m_i, q, PK + t * stride_pkt + g * stride_pkh, PV + t * stride_pvt + g * stride_pvh,
        stride_pkn, stride_pkd, stride_pvn, stride_pvd,
        K + b * stride_kb + g * stride_kh, V + b * stride_vb + g * stride_vh, stride_kn, stride_kd, stride_vn,
        stride_vd, KPM + b * stride_mb, stride_mn,
        p_lo, p_hi, s_lo, s_hi, n_keys - n_queries, n_keys - 1, n_keys - n_queries + row_i, offs_n, offs_d,
        offs_dv, qk_scale, terms, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, IS_CAUSAL, HAS_KPM,
        UPCAST, PRECISION, KEYS_SPLIT=True)
    finish_split(Out, LSE, M_PART, L_PART, ACC_PART, out_strides, lse_strides, b, row_h, row_i, offs_r < n_rows,
                 offs_dv, acc, l_i, m_i, n_heads, n_queries, num_splits, split_base, split, HEAD_DIM_V, SPLIT)


@triton.jit
def bank_rows(PREFIX_IDS, t, rank, n_batch, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    """The rows of a bank that use prefix t, in batch order, without a sort or a host sync: for each
    tile row's ``rank`` [BLOCK_R], the batch row b with prefix_ids[b] == t and rank-th among them (0
    past the last), and how many rows use t. One pass over prefix_ids in blocks of BLOCK_B (a running
    count plus a cumsum ranks the hits; a [BLOCK_R, BLOCK_B] compare picks each tile row's)."""
    offs_b = tl.arange(0, BLOCK_B)
    row_b = tl.zeros([BLOCK_R], dtype=tl.int32)  # int32 while live (fewer registers); callers widen it
    count = tl.zeros([], dtype=tl.int32)
    for start in range(0, n_batch, BLOCK_B):
        bs = start + offs_b
        ids = tl.load(PREFIX_IDS + bs, mask=bs < n_batch, other=0)
        hit = ((ids == t) & (bs < n_batch)).to(tl.int32)
        ranks = count + tl.cumsum(hit, 0) - 1  # the rank among t's rows of each hit
        match = (hit[None, :] != 0) & (ranks[None, :] == rank[:, None])
        row_b += tl.sum(tl.where(match, bs[None, :], 0), 1)
        count += tl.sum(hit, 0)
    return row_b, count


@triton.jit
def prefix_attention_shared_prefix_kernel(
    Q, PK, PV, ACC_PART, M_PART, L_PART,
    q_strides, pk_strides, pv_strides,
    n_heads, n_queries, n_rows_total, n_prefix, group, num_splits, keys_per_split, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    terms, PREFIX_IDS=None, stride_pkt=0, stride_pvt=0, n_batch=0, tiles_per_prefix=1,
    HAS_PREFIX_IDS: tl.constexpr = False, BLOCK_B: tl.constexpr = 16,
):
    """The cascade's prefix part (one prefix shared by every row): program (kv head g, prefix split
    s, row tile). Its BLOCK_R tile rows are taken from ALL rows' (query head, query) pairs of kv head
    g -- stacked row r is batch row r // (G * N), head g * G + (r % (G * N)) // N, query r % N -- so
    each prefix K/V block is read once per row tile instead of once per batch row. The prefix is
    visible to every query (no mask). Writes each row's partials (m, l, acc) at split s; the
    per-row kernel writes the sequence part at splits num_prefix_splits.., and the combine merges
    them all (split 0 here carries the sink logit).

    A bank (HAS_PREFIX_IDS, prefixes [T, Hkv, P, D] at stride_pkt): program axis 2 is (prefix t, one of
    its ``tiles_per_prefix`` tiles) over the rows using t (``bank_rows``); a tile past them returns."""
    stride_qb, stride_qh, stride_qm, stride_qd = q_strides
    stride_pkh, stride_pkn, stride_pkd = pk_strides
    stride_pvh, stride_pvn, stride_pvd = pv_strides
    g = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    tile = tl.program_id(2).to(tl.int64)
    if HAS_PREFIX_IDS:
        t = tile // tiles_per_prefix
        tile = tile % tiles_per_prefix
    offs_r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
    per_row = n_queries * group
    row_b = offs_r // per_row
    n_rows = n_rows_total
    if HAS_PREFIX_IDS:
        row_b, n_users = bank_rows(PREFIX_IDS, t, row_b, n_batch, BLOCK_R, BLOCK_B)
        n_rows = n_users * per_row
        if tile * BLOCK_R >= n_rows:  # no row of prefix t in this tile
            return
        PK += t * stride_pkt
        PV += t * stride_pvt
    row_h = g * group + (offs_r % per_row) // n_queries
    row_i = offs_r % n_queries
    row_ok = offs_r < n_rows
    q_rows = Q + row_b.to(tl.int64) * stride_qb + row_h * stride_qh + row_i * stride_qm
    q = load_tile(q_rows[:, None] + offs_d[None, :] * stride_qd, offs_r, n_rows, offs_d,
                  HEAD_DIM, HEAD_DIM_PAD, True, UPCAST)
    m_i, l_i, acc = start_rows(terms.sinks, row_h, row_ok, split, BLOCK_R, HEAD_DIM_V_PAD, terms.HAS_SINKS)
    lo = split * keys_per_split
    acc, l_i, m_i = attend_prefix(
        acc, l_i, m_i, q, PK + g * stride_pkh, PV + g * stride_pvh, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
        lo, tl.minimum(lo + keys_per_split, n_prefix), offs_r, offs_n, offs_d, offs_dv, qk_scale, terms,
        HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, UPCAST, PRECISION)
    part = ((row_b * n_heads + row_h) * n_queries + row_i) * num_splits + split
    store_partials(M_PART, L_PART, ACC_PART, part, m_i, l_i, acc, row_ok, offs_dv, HEAD_DIM_V)


@triton.jit
def prefix_attention_decode_combine_kernel(
    ACC_PART, M_PART, L_PART, Out, LSE,
    out_strides, lse_strides,
    n_heads, n_queries, num_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
):
    stride_ob, stride_oh, stride_om, stride_od = out_strides
    stride_lb, stride_lh = lse_strides
    row = tl.program_id(0).to(tl.int64)  # (b * Hq + h) * N + i: the partials' row
    i = row % n_queries
    bh = row // n_queries
    b = bh // n_heads
    h = bh % n_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    s_ok = offs_s < num_splits
    part = row * num_splits + offs_s
    m_s = tl.load(M_PART + part, mask=s_ok, other=float("-inf"))
    l_s = tl.load(L_PART + part, mask=s_ok, other=0.0)
    acc_s = tl.load(ACC_PART + part[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    m = tl.max(m_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(m_s - m_safe)  # 0 for a split that saw nothing (m_s = -inf, l_s = 0, acc_s = 0)
    l = tl.sum(w * l_s, 0)
    acc = tl.sum(w[:, None] * acc_s, 0)
    l_safe = tl.where(l == 0.0, 1.0, l)
    out = acc / l_safe
    lse = tl.where(l == 0.0, float("-inf"), m + tl.log2(l_safe))  # log2 units; NaN stays NaN
    tl.store(LSE + b * stride_lb + h * stride_lh + i, lse)
    o_ptrs = Out + b * stride_ob + h * stride_oh + i * stride_om + offs_d * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
