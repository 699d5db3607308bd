"""Triton backward of prefix attention.

Four kernels, each launched only when a gradient that needs it is asked for:
- ``delta_kernel``: delta_i = do_i . o_i (fp32), the softmax-backward row term.
- ``dq_kernel``: one program per (query block, row, query head); walks the prefix and the sequence
  keys like the forward (unmasked blocks, then masked ones) and accumulates
  dq = scale * sum_j ds_ij k_j over prefix and sequence keys.
- ``dkdv_kernel``: one program per (sequence key block, row, kv head); loops over the query heads
  of the group and the query blocks that can see the key block.
- ``dprefix_kernel``: one program per (prefix block, kv head, chunk). The reduction over every row
  that uses a prefix, every query head of the group and every query block is cut into chunks so a
  single shared prefix still fills the GPU. Rows arrive sorted by prefix id, so a chunk meets each
  prefix in one contiguous run and flushes its fp32 accumulator once per prefix: either into its
  own slice of a partial buffer (deterministic: the chunks are summed afterwards in a fixed order)
  or with fp32 atomics into the result.

Probabilities are recomputed from the forward's LSE (log2 domain inside the kernels). Rows with
lse = -inf (saw no key) are given lse = +inf, so every p of theirs is exp2(-inf) = 0.
"""

import triton
import triton.language as tl

from prefix_kernels.kernels.forward import load_tile, mm


@triton.jit
def delta_kernel(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    n_heads, n_queries,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    o = load_tile(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                  offs_m, n_queries, offs_d, HEAD_DIM, HEAD_DIM_PAD, True, False)
    do = load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                   offs_m, n_queries, offs_d, HEAD_DIM, HEAD_DIM_PAD, True, False)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), axis=1)
    tl.store(Delta + bh.to(tl.int64) * n_queries + offs_m, delta, mask=offs_m < n_queries)


@triton.jit
def load_lse2(LSE, rows, n_queries):
    """The forward's LSE (log2 units); -inf (no key seen) and rows past the end -> +inf, so p = 0."""
    lse = tl.load(LSE + rows, mask=rows < n_queries, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def prob(s, lse2):
    """P = exp2(s - lse2), at most 1: s is recomputed here in a different tile order than the forward,
    and at logits ~1e9 one fp32 ulp of s is ~128, which would otherwise give P = 2^128. NaN stays NaN."""
    return tl.minimum(tl.exp2(s - lse2), 1.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _dq_blocks(
    dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
    lo, hi, n_keys, q_pos, offs_n, offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    CHECK_KEYS: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_tile(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, cols, n_keys, offs_d,
                      HEAD_DIM, HEAD_DIM_PAD, CHECK_KEYS, UPCAST)
        v = load_tile(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, cols, n_keys, offs_d,
                      HEAD_DIM, HEAD_DIM_PAD, CHECK_KEYS, UPCAST)
        qk = mm(q, tl.trans(k), PRECISION) * qk_scale
        p = prob(qk, lse2[:, None])
        if CHECK_KEYS:
            p = tl.where(cols[None, :] < n_keys, p, 0.0)
        if CAUSAL_MASK:
            p = tl.where(cols[None, :] <= q_pos[:, None], p, 0.0)
        if HAS_KPM:
            keep = tl.load(KPM + cols * stride_mn, mask=cols < n_keys, other=0)
            p = tl.where(keep[None, :] != 0, p, 0.0)
        dp = mm(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        dq += mm(ds.to(k.dtype), k, PRECISION)
    return dq


@triton.jit
def dq_kernel(
    Q, K, V, PK, PV, PREFIX_IDS, KPM, DO, LSE, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkt, stride_pkh, stride_pkn, stride_pkd,
    stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    n_heads, n_queries, n_keys, n_prefix, group, scale, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_PREFIX_IDS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    g = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    t = tl.load(PREFIX_IDS + b).to(tl.int64) if HAS_PREFIX_IDS else 0

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q = load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                  offs_m, n_queries, offs_d, HEAD_DIM, HEAD_DIM_PAD, True, UPCAST)
    do = load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                   offs_m, n_queries, offs_d, HEAD_DIM, HEAD_DIM_PAD, True, UPCAST)
    lse2 = load_lse2(LSE + bh.to(tl.int64) * n_queries, offs_m, n_queries)
    delta = tl.load(Delta + bh.to(tl.int64) * n_queries + offs_m, mask=offs_m < n_queries, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=ACC_DTYPE)

    PK_base = PK + t * stride_pkt + g * stride_pkh
    PV_base = PV + t * stride_pvt + g * stride_pvh
    prefix_full = (n_prefix // BLOCK_N) * BLOCK_N
    dq = _dq_blocks(dq, q, do, lse2, delta, PK_base, PV_base, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
                    KPM, 0, 0, prefix_full, n_prefix, offs_m, offs_n, offs_d, qk_scale,
                    HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, False, False, False, UPCAST, PRECISION)
    dq = _dq_blocks(dq, q, do, lse2, delta, PK_base, PV_base, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
                    KPM, 0, prefix_full, n_prefix, n_prefix, offs_m, offs_n, offs_d, qk_scale,
                    HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, True, False, False, UPCAST, PRECISION)

    q_pos = n_keys - n_queries + offs_m
    if IS_CAUSAL:
        unmasked_end = tl.maximum(n_keys - n_queries + start_m + 1, 0) // BLOCK_N * BLOCK_N
        masked_end = tl.minimum(n_keys - n_queries + start_m + BLOCK_M, n_keys)
    else:
        unmasked_end = n_keys // BLOCK_N * BLOCK_N
        masked_end = n_keys
    K_base = K + b * stride_kb + g * stride_kh
    V_base = V + b * stride_vb + g * stride_vh
    KPM_base = KPM + b * stride_mb
    dq = _dq_blocks(dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    KPM_base, stride_mn, 0, unmasked_end, n_keys, q_pos, offs_n, offs_d, qk_scale,
                    HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, False, False, HAS_KPM, UPCAST, PRECISION)
    dq = _dq_blocks(dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    KPM_base, stride_mn, unmasked_end, masked_end, n_keys, q_pos, offs_n, offs_d, qk_scale,
                    HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, True, IS_CAUSAL, HAS_KPM, UPCAST, PRECISION)

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < n_queries) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, key_visible, cols, Q, DO, LSE, Delta,
    stride_qm, stride_qd, stride_dom, stride_dod,
    lo, hi, n_queries, key_offset, offs_m, offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    CHECK_ROWS: tl.constexpr, CAUSAL_MASK: tl.constexpr, MASK_KEYS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulates dk/dv ([BLOCK_N, D], unscaled dk) of one key tile over query blocks [lo, hi).

    Q/DO/LSE/Delta point at one (row, query head). Query i sits at position key_offset + i.
    """
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = load_tile(Q + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, rows, n_queries, offs_d,
                      HEAD_DIM, HEAD_DIM_PAD, CHECK_ROWS, UPCAST)
        do = load_tile(DO + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod, rows, n_queries, offs_d,
                       HEAD_DIM, HEAD_DIM_PAD, CHECK_ROWS, UPCAST)
        lse2 = load_lse2(LSE, rows, n_queries)  # +inf past n_queries: p = 0 there
        delta = tl.load(Delta + rows, mask=rows < n_queries, other=0.0)
        qk_t = mm(k, tl.trans(q), PRECISION) * qk_scale
        p_t = prob(qk_t, lse2[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(cols[:, None] <= key_offset + rows[None, :], p_t, 0.0)
        if MASK_KEYS:
            p_t = tl.where(key_visible[:, None], p_t, 0.0)
        dv += mm(p_t.to(do.dtype), do, PRECISION)
        dp_t = mm(v, tl.trans(do), PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += mm(ds_t.to(q.dtype), q, PRECISION)
    return dk, dv


@triton.jit
def dkdv_kernel(
    Q, K, V, KPM, DO, LSE, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    n_heads, n_kv_heads, n_queries, n_keys, group, scale, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bg = tl.program_id(1)
    b = (bg // n_kv_heads).to(tl.int64)
    g = (bg % n_kv_heads).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    cols = start_n + tl.arange(0, BLOCK_N)
    k = load_tile(K + b * stride_kb + g * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                  cols, n_keys, offs_d, HEAD_DIM, HEAD_DIM_PAD, True, UPCAST)
    v = load_tile(V + b * stride_vb + g * stride_vh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                  cols, n_keys, offs_d, HEAD_DIM, HEAD_DIM_PAD, True, UPCAST)
    key_visible = cols < n_keys
    if HAS_KPM:
        key_visible = key_visible & (tl.load(KPM + b * stride_mb + cols * stride_mn, mask=cols < n_keys, other=0) != 0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=ACC_DTYPE)

    # Query i (position key_offset + i) sees key j iff j <= key_offset + i.
    key_offset = n_keys - n_queries
    q_blocks_end = tl.cdiv(n_queries, BLOCK_M) * BLOCK_M
    full_end = n_queries // BLOCK_M * BLOCK_M
    if IS_CAUSAL:
        lo = tl.maximum(start_n - key_offset, 0) // BLOCK_M * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - key_offset, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.maximum(mid, lo), q_blocks_end)
    else:
        lo = 0
        mid = 0
    tail = tl.maximum(mid, full_end)
    for hh in range(0, group):
        h = g * group + hh
        Q_base = Q + b * stride_qb + h * stride_qh
        DO_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * n_heads + h) * n_queries
        # Across the diagonal: causal mask; fully visible blocks: none; the last partial block: bounds.
        dk, dv = _dkdv_blocks(dk, dv, k, v, key_visible, cols, Q_base, DO_base, LSE + row_base, Delta + row_base,
                              stride_qm, stride_qd, stride_dom, stride_dod, lo, mid, n_queries, key_offset,
                              offs_m, offs_d, qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M,
                              True, True, True, UPCAST, PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, key_visible, cols, Q_base, DO_base, LSE + row_base, Delta + row_base,
                              stride_qm, stride_qd, stride_dom, stride_dod, mid, full_end, n_queries, key_offset,
                              offs_m, offs_d, qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M,
                              False, False, HAS_KPM, UPCAST, PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, key_visible, cols, Q_base, DO_base, LSE + row_base, Delta + row_base,
                              stride_qm, stride_qd, stride_dom, stride_dod, tail, q_blocks_end, n_queries, key_offset,
                              offs_m, offs_d, qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M,
                              True, IS_CAUSAL, True, UPCAST, PRECISION)

    key_ok = cols[:, None] < n_keys
    d_ok = offs_d[None, :] < HEAD_DIM
    dk_ptrs = DK + b * stride_dkb + g * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + g * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=key_ok & d_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=key_ok & d_ok)


@triton.jit
def _flush_prefix_grads(dk, dv, DPK, DPV, chunk, t, g, cols, offs_d,
                        stride_c, stride_t, stride_h, stride_n, n_prefix, scale,
                        HEAD_DIM: tl.constexpr, DETERMINISTIC: tl.constexpr):
    """Adds one chunk's fp32 prefix-gradient tile to prefix t (its own partial slice, or atomically)."""
    offs = t * stride_t + g * stride_h + cols[:, None] * stride_n + offs_d[None, :]
    mask = (cols[:, None] < n_prefix) & (offs_d[None, :] < HEAD_DIM)
    if DETERMINISTIC:
        offs += chunk * stride_c
        tl.store(DPK + offs, (dk * scale).to(tl.float32), mask=mask)
        tl.store(DPV + offs, dv.to(tl.float32), mask=mask)
    else:
        tl.atomic_add(DPK + offs, (dk * scale).to(tl.float32), mask=mask)
        tl.atomic_add(DPV + offs, dv.to(tl.float32), mask=mask)


@triton.jit
def dprefix_kernel(
    Q, PK, PV, PREFIX_IDS, ROW_ORDER, DO, LSE, Delta, DPK, DPV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_pkt, stride_pkh, stride_pkn, stride_pkd,
    stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_gc, stride_gt, stride_gh, stride_gn,
    n_heads, n_queries, n_prefix, group, n_items, items_per_chunk, scale, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PREFIX_IDS: tl.constexpr, DETERMINISTIC: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Work items are (row in prefix order, query head of the group, query block), linearized;
    chunk c owns items [c * items_per_chunk, (c + 1) * items_per_chunk). DPK/DPV are fp32
    [C, T, Hkv, P, D] partials (deterministic) or [T, Hkv, P, D] (atomic), dense in D."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    key_visible = cols < n_prefix
    q_blocks = tl.cdiv(n_queries, BLOCK_M)
    items_per_row = group * q_blocks
    first = chunk * items_per_chunk
    last = tl.minimum(first + items_per_chunk, n_items)

    if HAS_PREFIX_IDS:
        t = tl.load(PREFIX_IDS + tl.load(ROW_ORDER + first // items_per_row)).to(tl.int64)
    else:
        t = tl.zeros([], dtype=tl.int64)
    pk = load_tile(PK + t * stride_pkt + g * stride_pkh + cols[:, None] * stride_pkn + offs_d[None, :] * stride_pkd,
                   cols, n_prefix, offs_d, HEAD_DIM, HEAD_DIM_PAD, True, UPCAST)
    pv = load_tile(PV + t * stride_pvt + g * stride_pvh + cols[:, None] * stride_pvn + offs_d[None, :] * stride_pvd,
                   cols, n_prefix, offs_d, HEAD_DIM, HEAD_DIM_PAD, True, UPCAST)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=ACC_DTYPE)
    for item in range(first, last):
        row = item // items_per_row
        hh = (item % items_per_row) // q_blocks
        start_m = (item % q_blocks) * BLOCK_M
        if HAS_PREFIX_IDS:
            b = tl.load(ROW_ORDER + row).to(tl.int64)
            t_row = tl.load(PREFIX_IDS + b).to(tl.int64)
            if t_row != t:  # next prefix's run starts: hand this one's sums over, start afresh
                _flush_prefix_grads(dk, dv, DPK, DPV, chunk, t, g, cols, offs_d, stride_gc, stride_gt, stride_gh,
                                    stride_gn, n_prefix, scale, HEAD_DIM, DETERMINISTIC)
                dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=ACC_DTYPE)
                dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=ACC_DTYPE)
                t = t_row
                pk = load_tile(PK + t * stride_pkt + g * stride_pkh + cols[:, None] * stride_pkn
                               + offs_d[None, :] * stride_pkd, cols, n_prefix, offs_d,
                               HEAD_DIM, HEAD_DIM_PAD, True, UPCAST)
                pv = load_tile(PV + t * stride_pvt + g * stride_pvh + cols[:, None] * stride_pvn
                               + offs_d[None, :] * stride_pvd, cols, n_prefix, offs_d,
                               HEAD_DIM, HEAD_DIM_PAD, True, UPCAST)
        else:
            b = row.to(tl.int64)
        h = g * group + hh
        row_base = (b * n_heads + h) * n_queries
        dk, dv = _dkdv_blocks(dk, dv, pk, pv, key_visible, cols,
                              Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                              LSE + row_base, Delta + row_base, stride_qm, stride_qd, stride_dom, stride_dod,
                              start_m, start_m + BLOCK_M, n_queries, 0, offs_m, offs_d, qk_scale,
                              HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, True, False, True, UPCAST, PRECISION)
    _flush_prefix_grads(dk, dv, DPK, DPV, chunk, t, g, cols, offs_d, stride_gc, stride_gt, stride_gh, stride_gn,
                        n_prefix, scale, HEAD_DIM, DETERMINISTIC)
