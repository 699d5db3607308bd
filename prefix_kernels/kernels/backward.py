"""Triton backward of prefix attention: key programs for dk/dv and the prefix gradients, and dq stored
by the same launch, with no atomics.

Three launches (fewer when gradients are not asked for), each written for sm_80/sm_90 and the CPU
interpreter:

1. ``backward_prologue_kernel``, one program per (query block, row, query head): delta_i = do_i . o_i
   (fp32), the softmax-backward row term; it also zeroes the fp32 accumulators that the main kernel
   adds into (dq, the prefix gradients), so no separate fill runs.
2. ``backward_kernel``, a 1-D grid of *key programs*, heaviest first:
   - prefix programs, one per (prefix block, kv head, chunk): the reduction over every row that uses
     the prefix, every query head of the group and every query block is cut into chunks of work
     items (row, query head, query block), so that one shared prefix still fills the GPU. A chunk
     keeps its dprefix tile in registers and flushes it into the fp32 result whenever the row's
     prefix changes and at the end (relaxed fp32 atomics; deterministic: its own partial slice);
   - sequence programs, one per (key block, row, kv head): dk/dv of the block stay in registers while
     the program walks the query heads of its group and the query blocks that see the block (one loop
     over the blocks across the diagonal / a window edge with the masks, one without any, one for the
     far edge). Each tile costs 4 matmuls: S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q.
   - dq (``NEED_DQ``): the sequence program of key block j also owns query blocks of BLOCK_N rows of
     its row and group (query block j + q_blocks - k_blocks, and every k_blocks-th one below it), and
     computes their dq like the forward walks its keys -- prefix, then sequence, BLOCK_M keys per step,
     3 matmuls (S, dP, dQ += dS K) -- storing it once. Under a causal mask the pairing balances the
     programs (the key blocks that few query blocks see pair with the query blocks that see many
     keys). 7 matmuls per (query, key) tile instead of flash attention's 5, but every matmul of both
     loops is an m64 wgmma on both warpgroups with no duplicated work, where dq^T from the dk/dv loop
     needed 16-query tiles (m64n8/n16 wgmma, both warpgroups computing the same S^T). Without sequence
     keys (M = 0) the prefix programs add dq atomically instead.
   Without dk/dv (or dprefix) the programs skip those loops.
3. ``backward_epilogue_kernel``: dq fp32 -> q's dtype and layout, and the prefix gradients fp32 ->
   the prefix dtype (summing the chunk partials in a fixed order when deterministic). It does not
   run when there is nothing to convert (fp32/fp64 inputs, atomic mode).

``deterministic=True`` computes dq in ``dq_kernel`` (one program per query block; the same walk,
``_dq_tile``) and the prefix gradients as per-chunk partials, so every sum has a fixed order:
bit-identical run to run. (Outside it only the prefix gradients use atomics.)

Probabilities are recomputed from the forward's LSE (log2 domain inside the kernels). Rows with
lse = -inf (saw no key) are given lse = +inf, so every p of theirs is exp2(-inf) = 0.
"""

import triton
import triton.language as tl

from prefix_kernels.kernels.tiles import (
    capped_scores, key_ranges, key_tile_scores, load_keep, load_lse2, load_tile, mask_scores, mm, prob,
    program_heads, query_ranges, scores, sink_logit2,
)


@triton.jit
def backward_prologue_kernel(
    Out, DO, Delta, DQ, ZERO_K, ZERO_V,
    out_strides, do_strides, dq_strides,
    n_heads, n_queries, n_zero, n_zero_v, zero_per_program,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    ZERO_DQ: tl.constexpr, ZERO_BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr,
    LSE=None, SINKS=None, DSINK_PART=None, SINK_GRAD: tl.constexpr = False,
):
    """delta for one query tile; zeroes that tile of the fp32 dq buffer (ZERO_DQ) and this program's
    share ``zero_per_program`` (a multiple of ZERO_BLOCK) of the flat buffers ZERO_K[n_zero], ZERO_V[n_zero_v]
    (the prefix-gradient accumulators; ZERO_BLOCK > 0). SINK_GRAD: this tile's part of the sink
    gradient, -sum_i p_sink,i * delta_i, into DSINK_PART[row, head, query block] (the epilogue sums it)."""
    stride_ob, stride_oh, stride_om, stride_od = out_strides
    stride_dob, stride_doh, stride_dom, stride_dod = do_strides
    stride_dqb, stride_dqh, stride_dqm, stride_dqd = dq_strides
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
    o = load_tile(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                  offs_m, n_queries, offs_dv, HEAD_DIM_V, HEAD_DIM_V_PAD, True, False)
    do = load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                   offs_m, n_queries, offs_dv, HEAD_DIM_V, HEAD_DIM_V_PAD, True, False)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), axis=1)
    tl.store(Delta + bh.to(tl.int64) * n_queries + offs_m, delta, mask=offs_m < n_queries)
    if SINK_GRAD:
        lse2 = load_lse2(LSE + bh.to(tl.int64) * n_queries, offs_m, n_queries)
        p_sink = tl.exp2(sink_logit2(SINKS, h, True, tl.float32) - lse2)
        tl.store(DSINK_PART + bh.to(tl.int64) * tl.num_programs(0) + tl.program_id(0),
                 -tl.sum(p_sink * delta.to(tl.float32), axis=0))
    if ZERO_DQ:
        dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
        tl.store(dq_ptrs, tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=DQ.dtype.element_ty),
                 mask=(offs_m[:, None] < n_queries) & (offs_d[None, :] < HEAD_DIM))
    if ZERO_BLOCK > 0:
        pid = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)).to(tl.int64)
        start = pid * zero_per_program
        end = tl.minimum(start + zero_per_program, tl.maximum(n_zero, n_zero_v))
        for off in range(start, end, ZERO_BLOCK):
            offs = off + tl.arange(0, ZERO_BLOCK)
            tl.store(ZERO_K + offs, tl.zeros([ZERO_BLOCK], dtype=ZERO_K.dtype.element_ty),
                     mask=(offs < end) & (offs < n_zero))
            tl.store(ZERO_V + offs, tl.zeros([ZERO_BLOCK], dtype=ZERO_V.dtype.element_ty),
                     mask=(offs < end) & (offs < n_zero_v))


@triton.jit
def _tile_grads(
    dk, dv, k, v, key_visible, cols, Q, DO, LSE, Delta, DQ,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd,
    start_m, n_queries, key_offset, offs_m, offs_d, offs_dv, qk_scale, scale, terms,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    CHECK_ROWS: tl.constexpr, CAUSAL_MASK: tl.constexpr, MASK_KEYS: tl.constexpr, SEQ_MASKS: tl.constexpr,
    NEED_DQ: tl.constexpr, NEED_DKDV: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One key tile (k, v: [BLOCK_N, D]) against query rows start_m + offs_m of one (row, query head):
    accumulates dk (unscaled) and dv, and (NEED_DQ) adds the tile's dq (scaled) into DQ atomically.
    Q/DO/LSE/Delta/DQ point at that (row, query head); query i sits at position key_offset + i. Rows
    past n_queries get p = 0 from their LSE, so CHECK_ROWS only keeps the loads in bounds."""
    rows = start_m + offs_m
    q = load_tile(Q + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, rows, n_queries, offs_d,
                  HEAD_DIM, HEAD_DIM_PAD, CHECK_ROWS, UPCAST)
    do = load_tile(DO + rows[:, None] * stride_dom + offs_dv[None, :] * stride_dod, rows, n_queries, offs_dv,
                   HEAD_DIM_V, HEAD_DIM_V_PAD, CHECK_ROWS, UPCAST)
    lse2 = load_lse2(LSE, rows, n_queries)  # +inf past n_queries: p = 0 there
    delta = tl.load(Delta + rows, mask=rows < n_queries, other=0.0)
    if terms.SOFTCAP:  # [keys, queries]
        s_t, dcap_t = capped_scores(k, q, qk_scale, terms.softcap2, PRECISION)
    else:
        s_t = scores(k, q, qk_scale, PRECISION)
    p_t = mask_scores(prob(s_t, lse2[None, :]), cols[:, None], key_offset + rows[None, :], key_visible[:, None],
                      0, 0.0, terms, False, CAUSAL_MASK, MASK_KEYS, SEQ_MASKS)
    if NEED_DKDV:
        dv += mm(p_t.to(do.dtype), do, PRECISION)
    dp_t = mm(v, tl.trans(do), PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if terms.SOFTCAP:
        ds_t = ds_t * dcap_t  # through c * tanh(s / c)
    if NEED_DKDV:
        dk += mm(ds_t.to(q.dtype), q, PRECISION)
    if NEED_DQ:  # dq^T = K^T dS^T: [D, BLOCK_M], so the matmul is D rows tall (wgmma) even for short query tiles
        dq_t = mm(tl.trans(k), ds_t.to(k.dtype), PRECISION) * scale
        tl.atomic_add(DQ + rows[None, :] * stride_dqm + offs_d[:, None] * stride_dqd, dq_t,
                      mask=(rows[None, :] < n_queries) & (offs_d[:, None] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def _key_block_grads(
    dk, dv, K, V, stride_kn, stride_kd, stride_vn, stride_vd, cols, n_keys, Q, DO, LSE, Delta,
    stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, group,
    lo, hi, n_queries, key_offset, offs_m, offs_d, offs_dv, qk_scale, terms,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL_MASK: tl.constexpr, SEQ_MASKS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk/dv of sequence keys ``cols`` from query blocks [lo, hi) of each of the ``group`` query heads
    that Q/DO/LSE/Delta point at (the first of them; LSE/Delta rows n_queries apart). Loads k/v itself:
    a key tile loaded once for several loops stays live in registers through all of them (spills).
    Rows past n_queries in the ragged last block need MASKED (CHECK_ROWS)."""
    k = load_tile(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, cols, n_keys, offs_d,
                  HEAD_DIM, HEAD_DIM_PAD, True, UPCAST)
    v = load_tile(V + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd, cols, n_keys, offs_dv,
                  HEAD_DIM_V, HEAD_DIM_V_PAD, True, UPCAST)
    # One loop over (head, query block): the tiles go to shared memory once, before it, where a loop per
    # head kept them live in registers through it and re-stored them per head (spills at D = 128).
    n_blocks = tl.maximum(hi - lo, 0) // BLOCK_M
    start_m = lo
    head = 0
    for _ in range(0, group * n_blocks):
        dk, dv = _tile_grads(
            dk, dv, k, v, cols, cols, Q + head * stride_qh, DO + head * stride_doh, LSE + head * n_queries,
            Delta + head * n_queries, Q, stride_qm, stride_qd, stride_dom, stride_dod, 0, 0, start_m, n_queries,
            key_offset, offs_m, offs_d, offs_dv, qk_scale, 1.0, terms, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V,
            HEAD_DIM_V_PAD, MASKED, CAUSAL_MASK, False, SEQ_MASKS, False, True, UPCAST, PRECISION)
        start_m += BLOCK_M
        next_head = start_m >= hi
        start_m = tl.where(next_head, lo, start_m)
        head = tl.where(next_head, head + 1, head)
    return dk, dv


@triton.jit
def _add_prefix_tile(ACC, x, chunk, t, g, cols, offs_d, stride_c, stride_t, stride_h, stride_n, n_prefix,
                     HEAD_DIM: tl.constexpr, DETERMINISTIC: tl.constexpr):
    """Adds a chunk's fp32 [BLOCK_N, D] tile to prefix t's gradient accumulator ACC [C, T, Hkv, P, D]
    (dense in D): into the chunk's own slice (deterministic; only this program writes it, in item
    order) or with relaxed atomics into slice 0."""
    offs = t * stride_t + g * stride_h + cols[:, None] * stride_n + offs_d[None, :]
    mask = (cols[:, None] < n_prefix) & (offs_d[None, :] < HEAD_DIM)
    if DETERMINISTIC:
        offs += chunk * stride_c
        tl.store(ACC + offs, tl.load(ACC + offs, mask=mask) + x.to(ACC.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ACC + offs, x.to(ACC.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit
def _flush_prefix_grads(dk, dv, DPK, DPV, chunk, t, g, cols, offs_d, offs_dv, stride_gk, stride_gv, n_prefix, scale,
                        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, DETERMINISTIC: tl.constexpr):
    """Adds one chunk's prefix-gradient tiles (dk unscaled, dv) to prefix t. stride_gk / stride_gv:
    the (chunk, t, kv head, key) strides of DPK / DPV, as tuples."""
    _add_prefix_tile(DPK, dk * scale, chunk, t, g, cols, offs_d, stride_gk[0], stride_gk[1], stride_gk[2],
                     stride_gk[3], n_prefix, HEAD_DIM, DETERMINISTIC)
    _add_prefix_tile(DPV, dv, chunk, t, g, cols, offs_dv, stride_gv[0], stride_gv[1], stride_gv[2], stride_gv[3],
                     n_prefix, HEAD_DIM_V, DETERMINISTIC)


@triton.jit
def _load_prefix_tiles(PK, PV, t, g, cols, offs_d, offs_dv, pk_strides, pv_strides, n_prefix,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                       HEAD_DIM_V_PAD: tl.constexpr, UPCAST: tl.constexpr):
    stride_pkt, stride_pkh, stride_pkn, stride_pkd = pk_strides
    stride_pvt, stride_pvh, stride_pvn, stride_pvd = pv_strides
    pk = load_tile(PK + t * stride_pkt + g * stride_pkh + cols[:, None] * stride_pkn + offs_d[None, :] * stride_pkd,
                   cols, n_prefix, offs_d, HEAD_DIM, HEAD_DIM_PAD, True, UPCAST)
    pv = load_tile(PV + t * stride_pvt + g * stride_pvh + cols[:, None] * stride_pvn + offs_dv[None, :] * stride_pvd,
                   cols, n_prefix, offs_dv, HEAD_DIM_V, HEAD_DIM_V_PAD, True, UPCAST)
    return pk, pv


@triton.jit
def _prefix_items(
    lo, hi, t, g, cols, key_visible, PK, PV, Q, DO, LSE, Delta, DQ, DPK, DPV, chunk,
    q_strides, pk_strides, pv_strides, do_strides, dq_strides, stride_gk, stride_gv,
    n_heads, n_queries, n_prefix, group, q_blocks, items_per_row, scale, qk_scale, terms,
    offs_m, offs_d, offs_dv,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NEED_DQ: tl.constexpr,
    NEED_DPREFIX: tl.constexpr, DETERMINISTIC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Work items [lo, hi) (row, query head of kv head g, query block) of one prefix program, all of rows
    that use prefix t: their gradients for prefix block ``cols``, added into DPK/DPV at the end, and
    their dq (atomically)."""
    stride_qb, stride_qh, stride_qm, stride_qd = q_strides
    stride_dob, stride_doh, stride_dom, stride_dod = do_strides
    stride_dqb, stride_dqh, stride_dqm, stride_dqd = dq_strides
    pk, pv = _load_prefix_tiles(PK, PV, t, g, cols, offs_d, offs_dv, pk_strides, pv_strides, n_prefix,
                                HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, UPCAST)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V_PAD], dtype=ACC_DTYPE)
    # item = (row * group + head in group) * q_blocks + query block, stepped with counters (no division
    # per item)
    b = (lo // items_per_row).to(tl.int64)
    hh = (lo % items_per_row) // q_blocks
    qb = lo % q_blocks
    for _ in range(lo, hi):
        h = g * group + hh
        start_m = qb * BLOCK_M
        row_base = (b * n_heads + h) * n_queries
        dk, dv = _tile_grads(
            dk, dv, pk, pv, key_visible, cols, Q + b * stride_qb + h * stride_qh,
            DO + b * stride_dob + h * stride_doh, LSE + row_base, Delta + row_base,
            DQ + b * stride_dqb + h * stride_dqh, stride_qm, stride_qd, stride_dom, stride_dod,
            stride_dqm, stride_dqd, start_m, n_queries, 0, offs_m, offs_d, offs_dv, qk_scale,
            scale, terms, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, True, False, NEED_DQ,
            False, NEED_DQ, NEED_DPREFIX, UPCAST, PRECISION)
        qb += 1
        next_head = qb == q_blocks
        qb = tl.where(next_head, 0, qb)
        hh = tl.where(next_head, hh + 1, hh)
        next_row = hh == group
        hh = tl.where(next_row, 0, hh)
        b = tl.where(next_row, b + 1, b)
    if NEED_DPREFIX:
        _flush_prefix_grads(dk, dv, DPK, DPV, chunk, t, g, cols, offs_d, offs_dv, stride_gk, stride_gv,
                            n_prefix, scale, HEAD_DIM, HEAD_DIM_V, DETERMINISTIC)


@triton.jit
def _segment_end(PREFIX_IDS, seg_lo, last, last_row, items_per_row):
    """(t, seg_hi): the prefix of the row of item seg_lo and the end of the items [seg_lo, seg_hi) of
    consecutive rows that use it, within the chunk's items (up to ``last``, in row last_row - 1)."""
    row = seg_lo // items_per_row
    t = tl.load(PREFIX_IDS + row).to(tl.int64)
    row += 1
    while (row < last_row) & (tl.load(PREFIX_IDS + tl.minimum(row, last_row - 1)).to(tl.int64) == t):
        row += 1
    return t, tl.minimum(row * items_per_row, last)


@triton.jit
def _prefix_program(
    pid, PK, PV, PREFIX_IDS, Q, DO, LSE, Delta, DQ, DPK, DPV,
    q_strides, pk_strides, pv_strides, do_strides, dq_strides, stride_gk, stride_gv,
    n_heads, n_kv_heads, n_queries, n_prefix, group, n_items, items_per_chunk, scale, qk_scale, terms,
    offs_m, offs_n, offs_d, offs_dv,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PREFIX_IDS: tl.constexpr,
    NEED_DQ: tl.constexpr, NEED_DPREFIX: tl.constexpr, DETERMINISTIC: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Prefix program ``pid``: prefix block x kv head x chunk of the work items (``_prefix_items``)."""
    prefix_blocks = tl.cdiv(n_prefix, BLOCK_N)
    cols = (pid % prefix_blocks) * BLOCK_N + offs_n
    g = ((pid // prefix_blocks) % n_kv_heads).to(tl.int64)
    chunk = (pid // (prefix_blocks * n_kv_heads)).to(tl.int64)
    key_visible = cols < n_prefix
    q_blocks = tl.cdiv(n_queries, BLOCK_M)
    items_per_row = group * q_blocks
    first = chunk * items_per_chunk
    last = tl.minimum(first + items_per_chunk, n_items)
    if HAS_PREFIX_IDS:
        # A bank: the chunk's items in segments of consecutive rows that use the same prefix, each
        # segment with its own dprefix tile, flushed after the segment's loop (a flush inside the item
        # loop kept its [BLOCK_N, D] addresses live through the loop and spilled).
        last_row = tl.cdiv(last, items_per_row)
        seg_lo = first
        while seg_lo < last:
            t, seg_hi = _segment_end(PREFIX_IDS, seg_lo, last, last_row, items_per_row)
            # cols + 0, but the compiler cannot tell: the segment's [BLOCK_N, D] load and flush addresses
            # are formed in the segment, not hoisted out of this loop and kept live through it (spills)
            seg_cols = cols + tl.minimum(seg_lo, 0)
            _prefix_items(
                seg_lo, seg_hi, t, g, seg_cols, seg_cols < n_prefix, PK, PV, Q, DO, LSE, Delta, DQ, DPK, DPV, chunk,
                q_strides, pk_strides, pv_strides, do_strides, dq_strides, stride_gk, stride_gv,
                n_heads, n_queries, n_prefix, group, q_blocks, items_per_row, scale, qk_scale, terms,
                offs_m, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N,
                NEED_DQ, NEED_DPREFIX, DETERMINISTIC, UPCAST, PRECISION, ACC_DTYPE)
            seg_lo = seg_hi
    else:
        _prefix_items(
            first, last, tl.zeros([], dtype=tl.int64), g, cols, key_visible, PK, PV, Q, DO, LSE, Delta, DQ,
            DPK, DPV, chunk, q_strides, pk_strides, pv_strides, do_strides, dq_strides, stride_gk, stride_gv,
            n_heads, n_queries, n_prefix, group, q_blocks, items_per_row, scale, qk_scale, terms,
            offs_m, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N,
            NEED_DQ, NEED_DPREFIX, DETERMINISTIC, UPCAST, PRECISION, ACC_DTYPE)


@triton.jit
def _paired_dq(
    b, g, key_block, Q, K, V, PK, PV, PREFIX_IDS, KPM, DO, LSE, Delta, DQ,
    q_strides, k_strides, v_strides, pk_strides, pv_strides, kpm_strides, do_strides, dq_strides,
    n_heads, n_queries, n_keys, n_prefix, group, scale, qk_scale, terms,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_PREFIX_IDS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """dq by plain stores, no atomics: the sequence program of key block ``key_block`` also owns query
    blocks of BLOCK_N rows (query tiles of BLOCK_N x BLOCK_M keys: the dk/dv tile transposed) of its row
    and group, paired from the end (key block j with query block j + q_blocks - k_blocks, then every
    k_blocks-th one below it), so that under a causal mask a program with few queries to walk for dk/dv
    has many keys for dq."""
    stride_qb, stride_qh, stride_qm, stride_qd = q_strides
    stride_kb, stride_kh, stride_kn, stride_kd = k_strides
    stride_vb, stride_vh, stride_vn, stride_vd = v_strides
    stride_pkt, stride_pkh, stride_pkn, stride_pkd = pk_strides
    stride_pvt, stride_pvh, stride_pvn, stride_pvd = pv_strides
    stride_mb, stride_mn = kpm_strides
    stride_dob, stride_doh, stride_dom, stride_dod = do_strides
    stride_dqb, stride_dqh, stride_dqm, stride_dqd = dq_strides
    q_blocks = tl.cdiv(n_queries, BLOCK_N)
    k_blocks = tl.cdiv(n_keys, BLOCK_N)
    first_qb = key_block + q_blocks - k_blocks
    rounds = tl.where(first_qb >= 0, first_qb // k_blocks + 1, 0)
    t = tl.load(PREFIX_IDS + b).to(tl.int64) if HAS_PREFIX_IDS else 0
    for i in range(0, rounds * group):
        h = g * group + i % group
        start_m = (first_qb - (i // group) * k_blocks) * BLOCK_N
        row_base = (b * n_heads + h) * n_queries
        _dq_tile(Q + b * stride_qb + h * stride_qh, K + b * stride_kb + g * stride_kh,
                 V + b * stride_vb + g * stride_vh, PK + t * stride_pkt + g * stride_pkh,
                 PV + t * stride_pvt + g * stride_pvh, KPM + b * stride_mb,
                 DO + b * stride_dob + h * stride_doh, LSE + row_base, Delta + row_base,
                 DQ + b * stride_dqb + h * stride_dqh,
                 stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_pkn, stride_pkd,
                 stride_pvn, stride_pvd, stride_mn, stride_dom, stride_dod, stride_dqm, stride_dqd,
                 start_m, n_queries, n_keys, n_prefix, scale, qk_scale, terms,
                 HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, BLOCK_M, IS_CAUSAL, HAS_KPM,
                 UPCAST, PRECISION, ACC_DTYPE)


@triton.jit
def _key_block_dkdv(
    b, g, start_n, cols, Q, K, V, KPM, DO, LSE, Delta, DK, DV,
    q_strides, k_strides, v_strides, kpm_strides, do_strides, dk_strides, dv_strides,
    n_heads, n_queries, n_keys, group, scale, qk_scale, terms, offs_m, offs_d, offs_dv,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """dk/dv of sequence keys ``cols`` of (row b, kv head g), stored. Query i (position key_offset + i)
    sees key j iff j <= key_offset + i. Row j of dk/dv depends on key j alone, so padded keys are
    zeroed once at the end (keys past n_keys are not stored) and only the blocks across the diagonal /
    a window edge carry a mask: three loops, each over every query head of the group."""
    stride_qb, stride_qh, stride_qm, stride_qd = q_strides
    stride_kb, stride_kh, stride_kn, stride_kd = k_strides
    stride_vb, stride_vh, stride_vn, stride_vd = v_strides
    stride_dob, stride_doh, stride_dom, stride_dod = do_strides
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V_PAD], dtype=ACC_DTYPE)
    key_offset = n_keys - n_queries
    masked_lo, free_lo, free_hi, masked_hi = query_ranges(start_n, n_queries, key_offset, terms, BLOCK_N,
                                                          BLOCK_M, IS_CAUSAL)
    Kb = K + b * stride_kb + g * stride_kh
    Vb = V + b * stride_vb + g * stride_vh
    Qb = Q + b * stride_qb + g * group * stride_qh
    DOb = DO + b * stride_dob + g * group * stride_doh
    row_base = (b * n_heads + g * group) * n_queries
    dk, dv = _key_block_grads(
        dk, dv, Kb, Vb, stride_kn, stride_kd, stride_vn, stride_vd, cols, n_keys, Qb, DOb, LSE + row_base,
        Delta + row_base, stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, group,
        masked_lo, free_lo, n_queries, key_offset, offs_m, offs_d, offs_dv, qk_scale, terms,
        HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, True, IS_CAUSAL, True,
        UPCAST, PRECISION)
    dk, dv = _key_block_grads(
        dk, dv, Kb, Vb, stride_kn, stride_kd, stride_vn, stride_vd, cols, n_keys, Qb, DOb, LSE + row_base,
        Delta + row_base, stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, group,
        free_lo, free_hi, n_queries, key_offset, offs_m, offs_d, offs_dv, qk_scale, terms,
        HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, False, False, False,
        UPCAST, PRECISION)
    dk, dv = _key_block_grads(
        dk, dv, Kb, Vb, stride_kn, stride_kd, stride_vn, stride_vd, cols, n_keys, Qb, DOb, LSE + row_base,
        Delta + row_base, stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, group,
        free_hi, masked_hi, n_queries, key_offset, offs_m, offs_d, offs_dv, qk_scale, terms,
        HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, True, IS_CAUSAL, True,
        UPCAST, PRECISION)
    _store_key_grads(DK, DV, KPM, dk_strides, dv_strides, kpm_strides, b, g, cols, offs_d, offs_dv, dk, dv, n_keys,
                     scale, HEAD_DIM, HEAD_DIM_V, HAS_KPM)


@triton.jit
def _store_key_grads(DK, DV, KPM, dk_strides, dv_strides, kpm_strides, b, g, cols, offs_d, offs_dv, dk, dv, n_keys,
                     scale, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, HAS_KPM: tl.constexpr):
    """dk (scaled) and dv of keys ``cols`` of (row b, kv head g); zero for padded keys."""
    stride_mb, stride_mn = kpm_strides
    stride_dkb, stride_dkh, stride_dkn, stride_dkd = dk_strides
    stride_dvb, stride_dvh, stride_dvn, stride_dvd = dv_strides
    key_ok = cols[:, None] < n_keys
    if HAS_KPM:
        keep = load_keep(KPM + b * stride_mb, stride_mn, cols, n_keys)[:, None]
        dk = tl.where(keep, dk, 0.0)
        dv = tl.where(keep, dv, 0.0)
    dk_ptrs = DK + b * stride_dkb + g * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + g * stride_dvh + cols[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=key_ok & (offs_d[None, :] < HEAD_DIM))
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=key_ok & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def backward_kernel(
    Q, K, V, PK, PV, PREFIX_IDS, KPM, DO, LSE, Delta, DQ, DK, DV, DPK, DPV,
    q_strides, k_strides, v_strides, pk_strides, pv_strides, kpm_strides, do_strides, dq_strides, dk_strides,
    dv_strides, dpk_acc_strides, dpv_acc_strides,
    batch, n_heads, n_kv_heads, n_queries, n_keys, n_prefix, group,
    n_prefix_programs, n_items, items_per_chunk, scale, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_PREFIX_IDS: tl.constexpr,
    NEED_DQ: tl.constexpr, NEED_DKDV: tl.constexpr, NEED_DPREFIX: tl.constexpr, DETERMINISTIC: tl.constexpr,
    PREFIX_PROGRAMS: tl.constexpr, SEQ_PROGRAMS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    terms,
):
    """Programs [0, n_prefix_programs) are prefix programs, the rest sequence programs (see the module
    docstring). DPK/DPV: fp32 [C, T, Hkv, P, D] partials (deterministic) or [T, Hkv, P, D], dense in D;
    dpk_acc_strides / dpv_acc_strides: their (chunk, t, kv head, key) strides."""
    # dq comes from the sequence programs (plain stores); the prefix programs add theirs atomically only
    # when there are none (no sequence keys).
    PREFIX_DQ: tl.constexpr = NEED_DQ and not SEQ_PROGRAMS
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    if PREFIX_PROGRAMS and (not SEQ_PROGRAMS or pid < n_prefix_programs):
        if NEED_DPREFIX or PREFIX_DQ:  # else launched for nothing: the sequence programs do all of dq
            _prefix_program(
                pid, PK, PV, PREFIX_IDS, Q, DO, LSE, Delta, DQ, DPK, DPV, q_strides, pk_strides, pv_strides,
                do_strides, dq_strides, dpk_acc_strides, dpv_acc_strides, n_heads, n_kv_heads, n_queries, n_prefix,
                group, n_items, items_per_chunk, scale, qk_scale, terms, offs_m, offs_n, offs_d, offs_dv,
                HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N, HAS_PREFIX_IDS,
                PREFIX_DQ, NEED_DPREFIX, DETERMINISTIC, UPCAST, PRECISION, ACC_DTYPE)
    elif SEQ_PROGRAMS:
        s = pid - n_prefix_programs
        bg = s % (batch * n_kv_heads)
        key_block = s // (batch * n_kv_heads)  # early key blocks first: the most query blocks see them
        start_n = key_block * BLOCK_N
        b = (bg // n_kv_heads).to(tl.int64)
        g = (bg % n_kv_heads).to(tl.int64)
        cols = start_n + offs_n
        if NEED_DQ:  # dq first: what stays live into the dk/dv phase then waits through the one with fewer
            _paired_dq(  # registers live
                b, g, key_block, Q, K, V, PK, PV, PREFIX_IDS, KPM, DO, LSE, Delta, DQ, q_strides, k_strides,
                v_strides, pk_strides, pv_strides, kpm_strides, do_strides, dq_strides, n_heads, n_queries, n_keys,
                n_prefix, group, scale, qk_scale, terms, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V,
                HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_KPM, HAS_PREFIX_IDS, UPCAST,
                PRECISION, ACC_DTYPE)
        if NEED_DKDV:
            _key_block_dkdv(
                b, g, start_n, cols, Q, K, V, KPM, DO, LSE, Delta, DK, DV, q_strides, k_strides, v_strides,
                kpm_strides, do_strides, dk_strides, dv_strides, n_heads, n_queries, n_keys, group, scale, qk_scale,
                terms, offs_m, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD,
                BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_KPM, UPCAST, PRECISION, ACC_DTYPE)


# ---------------------------------------------------------------- deterministic mode: dq in its own pass

@triton.jit
def _dq_blocks(
    dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
    lo, hi, n_keys, q_pos, offs_n, offs_d, offs_dv, qk_scale, terms,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    CHECK_KEYS: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_KPM: tl.constexpr, SEQ_MASKS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, s, dcap = key_tile_scores(q, K, stride_kn, stride_kd, KPM, stride_mn, cols, n_keys, q_pos, offs_d,
                                     qk_scale, terms, HEAD_DIM, HEAD_DIM_PAD, CHECK_KEYS, CAUSAL_MASK,
                                     HAS_KPM, SEQ_MASKS, UPCAST, PRECISION)
        p = prob(s, lse2[:, None])  # 0 where masked (-inf)
        v = load_tile(V + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd, cols, n_keys, offs_dv,
                      HEAD_DIM_V, HEAD_DIM_V_PAD, CHECK_KEYS, UPCAST)
        dp = mm(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        if terms.SOFTCAP:
            ds = ds * dcap
        dq += mm(ds.to(k.dtype), k, PRECISION)
    return dq


@triton.jit
def _dq_tile(
    Q, K, V, PK, PV, KPM, DO, LSE, Delta, DQ,
    stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
    stride_mn, stride_dom, stride_dod, stride_dqm, stride_dqd,
    start_m, n_queries, n_keys, n_prefix, scale, qk_scale, terms,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """dq of query rows [start_m, start_m + BLOCK_M) of one (row, query head), stored (scaled) into DQ:
    the prefix keys, then the sequence keys in the forward's ranges (tiles.key_ranges), BLOCK_N keys
    per step. Q/DO/LSE/Delta/DQ point at the (row, query head), K/V/KPM at the row and kv head,
    PK/PV at the row's prefix and kv head."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
    q = load_tile(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                  offs_m, n_queries, offs_d, HEAD_DIM, HEAD_DIM_PAD, True, UPCAST)
    do = load_tile(DO + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                   offs_m, n_queries, offs_dv, HEAD_DIM_V, HEAD_DIM_V_PAD, True, UPCAST)
    lse2 = load_lse2(LSE, offs_m, n_queries)
    delta = tl.load(Delta + offs_m, mask=offs_m < n_queries, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=ACC_DTYPE)

    prefix_full = (n_prefix // BLOCK_N) * BLOCK_N
    dq = _dq_blocks(dq, q, do, lse2, delta, PK, PV, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
                    KPM, 0, 0, prefix_full, n_prefix, offs_m, offs_n, offs_d, offs_dv, qk_scale, terms, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, False, False, False, False, UPCAST, PRECISION)
    dq = _dq_blocks(dq, q, do, lse2, delta, PK, PV, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
                    KPM, 0, prefix_full, n_prefix, n_prefix, offs_m, offs_n, offs_d, offs_dv, qk_scale, terms, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, True, False, False, False, UPCAST, PRECISION)

    first_pos = n_keys - n_queries + start_m
    q_pos = first_pos + offs_m - start_m
    masked_lo, free_lo, free_hi, masked_hi = key_ranges(0, n_keys, first_pos, first_pos + BLOCK_M - 1, terms,
                                                        BLOCK_N, IS_CAUSAL)
    if terms.WINDOW_MASK != 0:
        dq = _dq_blocks(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                        KPM, stride_mn, masked_lo, free_lo, n_keys, q_pos, offs_n, offs_d, offs_dv, qk_scale,
                        terms, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, True, IS_CAUSAL, HAS_KPM, True,
                        UPCAST, PRECISION)
    dq = _dq_blocks(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                    KPM, stride_mn, free_lo, free_hi, n_keys, q_pos, offs_n, offs_d, offs_dv, qk_scale, terms, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, False, False, HAS_KPM, False, UPCAST, PRECISION)
    dq = _dq_blocks(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                    KPM, stride_mn, free_hi, masked_hi, n_keys, q_pos, offs_n, offs_d, offs_dv, qk_scale,
                    terms, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, True, IS_CAUSAL, HAS_KPM, True,
                    UPCAST, PRECISION)

    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, (dq * scale).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < n_queries) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def dq_kernel(
    Q, K, V, PK, PV, PREFIX_IDS, KPM, DO, LSE, Delta, DQ,
    q_strides, k_strides, v_strides, pk_strides, pv_strides, kpm_strides, do_strides, dq_strides,
    n_heads, n_queries, n_keys, n_prefix, group, scale, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_PREFIX_IDS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    terms,
):
    """Deterministic mode's dq: one program per (query block, row, query head) (``_dq_tile``)."""
    stride_qb, stride_qh, stride_qm, stride_qd = q_strides
    stride_kb, stride_kh, stride_kn, stride_kd = k_strides
    stride_vb, stride_vh, stride_vn, stride_vd = v_strides
    stride_pkt, stride_pkh, stride_pkn, stride_pkd = pk_strides
    stride_pvt, stride_pvh, stride_pvn, stride_pvd = pv_strides
    stride_mb, stride_mn = kpm_strides
    stride_dob, stride_doh, stride_dom, stride_dod = do_strides
    stride_dqb, stride_dqh, stride_dqm, stride_dqd = dq_strides
    bh = tl.program_id(1)
    b, h, g, t = program_heads(bh, n_heads, group, PREFIX_IDS, HAS_PREFIX_IDS)
    row_base = bh.to(tl.int64) * n_queries
    _dq_tile(Q + b * stride_qb + h * stride_qh, K + b * stride_kb + g * stride_kh, V + b * stride_vb + g * stride_vh,
             PK + t * stride_pkt + g * stride_pkh, PV + t * stride_pvt + g * stride_pvh, KPM + b * stride_mb,
             DO + b * stride_dob + h * stride_doh, LSE + row_base, Delta + row_base, DQ + b * stride_dqb + h * stride_dqh,
             stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_pkn, stride_pkd, stride_pvn,
             stride_pvd, stride_mn, stride_dom, stride_dod, stride_dqm, stride_dqd,
             tl.program_id(0) * BLOCK_M, n_queries, n_keys, n_prefix, scale, qk_scale, terms,
             HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_KPM,
             UPCAST, PRECISION, ACC_DTYPE)


@triton.jit
def backward_epilogue_kernel(
    DQ_ACC, DQ, DPK_ACC, DPV_ACC, DPK, DPV,
    dq_acc_strides, dq_strides,
    n_heads, n_queries, n_dq_programs, n_prefix_elems, n_chunks,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
    CONVERT_DQ: tl.constexpr, CONVERT_DPREFIX: tl.constexpr,
    n_dp_programs=0, DSINK_PART=None, DSINKS=None, batch=0, sink_parts=0, SINK_GRAD: tl.constexpr = False,
    n_prefix_elems_v=0,
):
    """Programs [0, n_dq_programs): one dq tile (query block, row x head) fp32 -> DQ's dtype/strides.
    The next n_dp_programs: BLOCK_E elements of the prefix gradients: DPK_ACC / DPV_ACC are fp32
    [C, n_prefix_elems] / [C, n_prefix_elems_v] (C chunk partials, dense), summed over C in chunk
    order into the dense DPK / DPV.
    The last n_heads (SINK_GRAD): head h's sink gradient, the prologue's DSINK_PART[b, h, :sink_parts]
    summed in a fixed order."""
    stride_ab, stride_ah, stride_am, stride_ad = dq_acc_strides
    stride_dqb, stride_dqh, stride_dqm, stride_dqd = dq_strides
    pid = tl.program_id(0)
    if SINK_GRAD and pid >= n_dq_programs + n_dp_programs:
        head = (pid - n_dq_programs - n_dp_programs).to(tl.int64)
        total = tl.zeros([BLOCK_E], dtype=tl.float32)
        for row in range(0, batch):
            base = DSINK_PART + (row * n_heads + head) * sink_parts
            for off in range(0, sink_parts, BLOCK_E):
                parts = off + tl.arange(0, BLOCK_E)
                total += tl.load(base + parts, mask=parts < sink_parts, other=0.0)
        tl.store(DSINKS + head, tl.sum(total, axis=0).to(DSINKS.dtype.element_ty))
    elif pid < n_dq_programs:
        if CONVERT_DQ:
            q_blocks = tl.cdiv(n_queries, BLOCK_M)
            offs_m = (pid % q_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
            bh = pid // q_blocks
            b = (bh // n_heads).to(tl.int64)
            h = (bh % n_heads).to(tl.int64)
            offs_d = tl.arange(0, HEAD_DIM_PAD)
            tile_ok = (offs_m[:, None] < n_queries) & (offs_d[None, :] < HEAD_DIM)
            dq = tl.load(DQ_ACC + b * stride_ab + h * stride_ah + offs_m[:, None] * stride_am
                         + offs_d[None, :] * stride_ad, mask=tile_ok)
            tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
                     dq.to(DQ.dtype.element_ty), mask=tile_ok)
    else:
        if CONVERT_DPREFIX:
            offs = (pid - n_dq_programs).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
            k_ok = offs < n_prefix_elems
            v_ok = offs < n_prefix_elems_v
            acc_k = tl.zeros([BLOCK_E], dtype=DPK_ACC.dtype.element_ty)
            acc_v = tl.zeros([BLOCK_E], dtype=DPV_ACC.dtype.element_ty)
            for c in range(0, n_chunks):
                acc_k += tl.load(DPK_ACC + c * n_prefix_elems + offs, mask=k_ok, other=0.0)
                acc_v += tl.load(DPV_ACC + c * n_prefix_elems_v + offs, mask=v_ok, other=0.0)
            tl.store(DPK + offs, acc_k.to(DPK.dtype.element_ty), mask=k_ok)
            tl.store(DPV + offs, acc_v.to(DPV.dtype.element_ty), mask=v_ok)
