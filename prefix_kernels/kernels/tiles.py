"""The pieces every Triton kernel of the package is made of: load a tile, score a tile, mask its
scores, one online-softmax step, the key (or query) ranges a tile walks, and the walk over the
prefix and then the sequence. The forward (forward.py), the decode kernel (decode.py) and the
backward (backward.py) are written with these, so a change of the attention pattern -- which keys
a query sees (causal, padding, sliding windows), how a score is formed (softcapping) -- is one
edit here.

The score terms travel as one argument, ``terms`` (kernels/plan.py's ``ScoreArgs``: scalars, tensors
and ``tl.constexpr`` flags), passed whole from the kernel down to the helpers. A new term is one field
there (and in plan.ScoreTerms) and its code here: a term of the score in ``key_tile_scores`` (and the
backward's ``_tile_grads``), a mask in ``mask_scores`` under SEQ_MASKS (the range-edge blocks) with the
ranges it leaves in ``key_ranges`` / ``query_ranges``.

Conventions: scores live in the log2 domain (``qk_scale = scale * log2(e)``); query i of N sits at
position M - N + i of the M sequence keys (bottom-right causal); the prefix is always visible.
"""

import triton
import triton.language as tl


@triton.jit
def load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
              CHECK_ROWS: tl.constexpr, UPCAST: tl.constexpr):
    """A [rows, HEAD_DIM_PAD] tile, zero past n_rows (if CHECK_ROWS) and past HEAD_DIM."""
    if CHECK_ROWS:
        if HEAD_DIM == HEAD_DIM_PAD:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == HEAD_DIM_PAD:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    if UPCAST:  # the interpreter multiplies raw bf16 bits in tl.dot: compute in fp32 there
        x = x.to(tl.float32)
    return x


@triton.jit
def program_heads(bh, n_heads, group, PREFIX_IDS, HAS_PREFIX_IDS: tl.constexpr):
    """(batch row b, query head h, kv head g, prefix t), int64, of a program over (row x query head)
    ``bh``; t = prefix_ids[b] with a bank, else 0."""
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    g = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    t = tl.load(PREFIX_IDS + b).to(tl.int64) if HAS_PREFIX_IDS else 0
    return b, h, g, t


@triton.jit
def mm(a, b, PRECISION: tl.constexpr):
    """a @ b. PRECISION "fma": a broadcast product summed in registers, for fp64, where Triton's
    fp64 MMA path asserts on sm_90 ("fp64 don't support largeK MMA"); else tl.dot."""
    if PRECISION == "fma":
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def scores(a, b, qk_scale, PRECISION: tl.constexpr):
    """The log2-domain scores a @ b^T * qk_scale: [queries, keys] for (q, k), [keys, queries] for
    (k, q) in the backward. The one place a score is formed (``capped_scores`` under a softcap)."""
    return mm(a, tl.trans(b), PRECISION) * qk_scale


@triton.jit
def scaled_tanh(u):
    """K tanh(u / K) with K = 2 log2(e), to a few ulp of relative error for every u, NaN-propagating:
    in this scale the exp2 form is K - 2K / (2^u + 1) (exact at both ends: +-K for |u| -> inf; an
    approximate fp32 reciprocal, which is 0 past 2^126, where the true term is below half an ulp of K).
    For small |u| that form cancels (relative error ~ ulp / |u|, which softcap's c * tanh(s / c)
    turns into an absolute error ~ c * ulp in the score): an odd polynomial there, u + u^3 q(u^2), the
    coefficients of tanh(x) = x + x^3 p(x^2) over K^(2i+2) -- fp32: p minimax for relative error on
    |x| < 0.4 (6e-8); fp64: the Taylor series to x^15 on |x| < 0.1 (2e-16). Both sides are computed
    (SIMT) and one selected: ~11 instructions per element in fp32."""
    y = u * u
    if u.dtype == tl.float64:
        q = ((((((-5.251078232438367e-10 * y + 1.078691838157224e-08) * y - 2.2158836045334442e-07) * y
                + 4.552001005494151e-06) * y - 9.35214345312455e-05) * y + 0.0019236258215256953) * y
             - 0.040037751159850116)
        small = tl.abs(u) < 0.2885390081777927  # |x| < 0.1
        by_exp = 2.8853900817779268 - 5.7707801635558535 / (tl.exp2(u) + 1.0)
    else:
        q = ((3.901461452654945e-06 * y - 9.281732911792606e-05) * y + 0.0019233200025523649) * y - 0.04003770939722125
        small = tl.abs(u) < 1.1541560327111708  # |x| < 0.4
        by_exp = 2.8853900817779268 - 5.7707801635558535 * tl.fdiv(1.0, tl.exp2(u) + 1.0, approx=True)
    return tl.where(small, u + (u * y) * q, by_exp)


@triton.jit
def capped_scores(a, b, qk_scale, softcap2, PRECISION: tl.constexpr):
    """``scores`` under Gemma 2's logit softcapping c * tanh(score / c), in the log2 domain
    (``softcap2 = c * log2(e)``): (the capped scores, their derivative in the uncapped ones,
    1 - tanh^2, for the backward). One multiply per score forms the argument of ``scaled_tanh``
    (qk_scale, 1 / softcap2 and its K in one scalar), one turns its result into the capped score."""
    u = mm(a, tl.trans(b), PRECISION) * (qk_scale * (2.8853900817779268 / softcap2))
    v = scaled_tanh(u)
    return v * (softcap2 / 2.8853900817779268), 1.0 - (v * v) * 0.12011325347955036  # 1 / K^2


@triton.jit
def mask_scores(s, cols, pos, keep, n_keys, fill, terms,
                CHECK_KEYS: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_KEEP: tl.constexpr,
                SEQ_MASKS: tl.constexpr):
    """``s`` with ``fill`` where a query may not see a key. ``cols`` (key index), ``pos`` (query
    position) and ``keep`` (bool, e.g. the padding mask) come broadcast to s's shape: [1, N] / [M, 1]
    for a [queries, keys] tile, the other way round for a transposed one. CHECK_KEYS: key < n_keys;
    CAUSAL_MASK: key <= position; HAS_KEEP: keep; SEQ_MASKS: the position masks of the score terms
    (sequence keys at a range edge): ``terms.WINDOW_MASK`` (sliding window of ``terms.window`` keys)
    1 = key > position - window (causal windows), 2 = also key < position + window (non-causal)."""
    if CHECK_KEYS:
        s = tl.where(cols < n_keys, s, fill)
    if CAUSAL_MASK:
        s = tl.where(cols <= pos, s, fill)
    if HAS_KEEP:
        s = tl.where(keep, s, fill)
    if SEQ_MASKS and terms.WINDOW_MASK >= 1:
        s = tl.where(cols > pos - terms.window, s, fill)
    if SEQ_MASKS and terms.WINDOW_MASK == 2:
        s = tl.where(cols < pos + terms.window, s, fill)
    return s


@triton.jit
def load_keep(KPM, stride_mn, cols, n_keys):
    """The padding mask of keys ``cols`` (True = attend); keys past n_keys are not kept."""
    return tl.load(KPM + cols * stride_mn, mask=cols < n_keys, other=0) != 0


@triton.jit
def online_softmax_step(acc, l_i, m_i, qk, v, PRECISION: tl.constexpr):
    """One key block of the online softmax: rescale (acc, l) to the new running max and add this
    block's exp2(qk - m) and exp2(qk - m) @ v. A row whose max is still -inf (it saw nothing yet)
    uses 0 as its max, so it stays at l = 0, acc = 0 instead of turning NaN."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, PRECISION)
    return acc, l_i, m_new


@triton.jit
def online_softmax_step_scaled(acc, l_i, m_i, s, qk_scale, v, PRECISION: tl.constexpr):
    """``online_softmax_step`` of the scores ``s * qk_scale`` (qk_scale > 0, validated), the max taken
    over the unscaled s and scaled once per row: fl(x * c) is monotone in x, so max(s) * c equals
    max(s * c) exactly, and the step gives the same numbers with one multiply per row instead of one
    per score (the forward's hot loop at D <= 64 is issue-bound)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s * qk_scale - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, PRECISION)
    return acc, l_i, m_new


@triton.jit
def sink_logit2(SINKS, heads, valid, DTYPE: tl.constexpr):
    """gpt-oss's per-head sink logits in DTYPE, in the log2 domain of the scores (0 where not ``valid``)."""
    return tl.load(SINKS + heads, mask=valid, other=0.0).to(DTYPE) * 1.4426950408889634


@triton.jit
def finish_rows(acc, l_i, m_i):
    """(out, lse in log2 units) of finished online-softmax rows; a row that saw no key gets out = 0,
    lse = -inf. NaN stays NaN."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    return acc / l_safe[:, None], lse


@triton.jit
def key_ranges(s_lo, s_hi, first_pos, last_pos, terms, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """How a tile of queries at positions [first_pos, last_pos] walks sequence keys [s_lo, s_hi):
    (masked_lo, free_lo, free_hi, masked_hi) with [masked_lo, free_lo) masked blocks (the lower edge
    of a sliding window), [free_lo, free_hi) whole blocks every query sees (no mask but padding),
    [free_hi, masked_hi) masked blocks (the causal diagonal, the upper edge of a non-causal window,
    the end). Keys outside [masked_lo, masked_hi) are seen by no query of the tile and are never
    read: with a window the work grows with the window, not the sequence."""
    window = terms.window
    any_lo = s_lo  # keys some query of the tile sees: [any_lo, any_hi); every query: [all_lo, all_hi)
    all_lo = s_lo
    any_hi = s_hi
    all_hi = s_hi
    if IS_CAUSAL:
        any_hi = tl.minimum(s_hi, last_pos + 1)
        all_hi = tl.minimum(s_hi, first_pos + 1)
    if terms.WINDOW_MASK != 0:
        any_lo = tl.maximum(s_lo, first_pos - window + 1)
        all_lo = tl.maximum(s_lo, last_pos - window + 1)
        if not IS_CAUSAL:
            any_hi = tl.minimum(s_hi, last_pos + window)
            all_hi = tl.minimum(s_hi, first_pos + window)
    masked_hi = tl.maximum(any_hi, s_lo)
    masked_lo = tl.minimum(s_lo + tl.maximum(any_lo - s_lo, 0) // BLOCK_N * BLOCK_N, masked_hi)
    free_lo = tl.minimum(tl.maximum(s_lo + tl.cdiv(tl.maximum(all_lo - s_lo, 0), BLOCK_N) * BLOCK_N, masked_lo), masked_hi)
    free_hi = free_lo + tl.maximum(all_hi - free_lo, 0) // BLOCK_N * BLOCK_N
    return masked_lo, free_lo, free_hi, masked_hi


@triton.jit
def query_ranges(start_n, n_queries, key_offset, terms, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 IS_CAUSAL: tl.constexpr):
    """The query blocks that see sequence keys [start_n, start_n + BLOCK_N) (query i sits at
    position key_offset + i), as (masked_lo, free_lo, free_hi, masked_hi): [masked_lo, free_lo)
    masked blocks (across the causal diagonal, the lower edge of a non-causal window), [free_lo,
    free_hi) whole blocks that see every key of the block, [free_hi, masked_hi) masked blocks (a
    window's upper edge, the ragged last block). Other query blocks see none of these keys."""
    window = terms.window
    first_key = start_n - key_offset  # the block's keys in query coordinates (key j <-> query j - key_offset)
    last_key = start_n + BLOCK_N - 1 - key_offset
    any_lo = 0  # queries that see some key of the block: [any_lo, any_hi); all of them: [all_lo, all_hi)
    all_lo = 0
    any_hi = n_queries
    all_hi = n_queries
    if IS_CAUSAL:
        any_lo = tl.maximum(first_key, 0)
        all_lo = tl.maximum(last_key, 0)
    if terms.WINDOW_MASK != 0:
        any_hi = tl.minimum(n_queries, last_key + window)
        all_hi = tl.minimum(n_queries, first_key + window)
        if not IS_CAUSAL:
            any_lo = tl.maximum(first_key - window + 1, 0)
            all_lo = tl.maximum(last_key - window + 1, 0)
    masked_hi = tl.cdiv(tl.maximum(any_hi, 0), BLOCK_M) * BLOCK_M
    masked_lo = tl.minimum(any_lo // BLOCK_M * BLOCK_M, masked_hi)
    free_lo = tl.minimum(tl.maximum(tl.cdiv(all_lo, BLOCK_M) * BLOCK_M, masked_lo), masked_hi)
    free_hi = free_lo + tl.maximum(all_hi - free_lo, 0) // BLOCK_M * BLOCK_M
    return masked_lo, free_lo, free_hi, masked_hi


@triton.jit
def key_tile_scores(
    q, K, stride_kn, stride_kd, KPM, stride_mn, cols, n_keys, q_pos, offs_d, qk_scale, terms,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CHECK_KEYS: tl.constexpr, CAUSAL_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr, SEQ_MASKS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    KEYS_SPLIT: tl.constexpr = False,
):
    """Loads keys ``cols`` of one source and scores the query tile against them: (k, the log2-domain
    scores [queries, keys] with -inf where a query may not see a key, d(softcap)/d(score) -- the
    scores themselves when ``terms.SOFTCAP`` is off, unused then). ``KEYS_SPLIT``: n_keys ends a split
    of the key axis (decode's split-K), not the sequence, so a causal mask does not bound the keys."""
    k = load_tile(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, cols, n_keys, offs_d,
                  HEAD_DIM, HEAD_DIM_PAD, CHECK_KEYS, UPCAST)
    keep = cols[None, :] >= 0  # unused unless HAS_KPM
    if HAS_KPM:
        keep = load_keep(KPM, stride_mn, cols, n_keys)[None, :]
    if terms.SOFTCAP:
        s, dcap = capped_scores(q, k, qk_scale, terms.softcap2, PRECISION)
    else:
        s = scores(q, k, qk_scale, PRECISION)
        dcap = s
    # Under a causal mask key <= position <= n_keys - 1 for every real query where n_keys ends the
    # sequence: the key check only guards the loads (rows past the queries see zero keys, and their
    # results are not stored / have p = 0)
    s = mask_scores(s, cols[None, :], q_pos[:, None], keep, n_keys, float("-inf"), terms,
                    CHECK_KEYS and (KEYS_SPLIT or not CAUSAL_MASK), CAUSAL_MASK, HAS_KPM, SEQ_MASKS)
    return k, s, dcap


@triton.jit
def attend_blocks(
    acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
    lo, hi, n_keys, q_pos, offs_n, offs_d, offs_dv, qk_scale, terms,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, CHECK_KEYS: tl.constexpr = False,
    CAUSAL_MASK: tl.constexpr = False, HAS_KPM: tl.constexpr = False, SEQ_MASKS: tl.constexpr = False,
    KEYS_SPLIT: tl.constexpr = False,
):
    """Online-softmax update over key blocks [lo, hi) of one key source; the flags choose the masks
    (``mask_scores``; KEYS_SPLIT: see ``key_tile_scores``). k has HEAD_DIM columns, v HEAD_DIM_V (offs_d / offs_dv: their padded aranges)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        _, qk, _ = key_tile_scores(q, K, stride_kn, stride_kd, KPM, stride_mn, cols, n_keys, q_pos, offs_d, qk_scale,
                                   terms, HEAD_DIM, HEAD_DIM_PAD, CHECK_KEYS, CAUSAL_MASK, HAS_KPM, SEQ_MASKS, UPCAST,
                                   PRECISION, KEYS_SPLIT)
        v = load_tile(V + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd, cols, n_keys, offs_dv,
                      HEAD_DIM_V, HEAD_DIM_V_PAD, CHECK_KEYS, UPCAST)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, PRECISION)
    return acc, l_i, m_i


@triton.jit
def attend_prefix(
    acc, l_i, m_i, q, PK, PV, stride_pkn, stride_pkd, stride_pvn, stride_pvd, p_lo, p_hi, q_pos, offs_n, offs_d,
    offs_dv, qk_scale, terms,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Prefix keys [p_lo, p_hi), visible to every query: whole blocks unmasked, then one block masked
    to p_hi."""
    p_full = p_lo + (p_hi - p_lo) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = attend_blocks(
        acc, l_i, m_i, q, PK, PV, stride_pkn, stride_pkd, stride_pvn, stride_pvd, PK, 0,
        p_lo, p_full, p_hi, q_pos, offs_n, offs_d, offs_dv, qk_scale, terms,
        HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, UPCAST, PRECISION)
    acc, l_i, m_i = attend_blocks(
        acc, l_i, m_i, q, PK, PV, stride_pkn, stride_pkd, stride_pvn, stride_pvd, PK, 0,
        p_full, p_hi, p_hi, q_pos, offs_n, offs_d, offs_dv, qk_scale, terms,
        HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, UPCAST, PRECISION, CHECK_KEYS=True)
    return acc, l_i, m_i


@triton.jit
def attend_sequence_edges(
    acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
    masked_lo, free_lo, free_hi, masked_hi, s_hi, q_pos, offs_n, offs_d, offs_dv, qk_scale, terms,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, FREE: tl.constexpr, KEYS_SPLIT: tl.constexpr = False,
):
    """Sequence keys in the ranges of ``key_ranges``: a window's lower edge [masked_lo, free_lo)
    (masked), (FREE) the blocks every query sees [free_lo, free_hi) (padding only), then the causal
    diagonal / a window's upper edge / the end [free_hi, masked_hi) (masked)."""
    if terms.WINDOW_MASK != 0:
        acc, l_i, m_i = attend_blocks(
            acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
            masked_lo, free_lo, s_hi, q_pos, offs_n, offs_d, offs_dv, qk_scale, terms,
            HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, UPCAST, PRECISION,
            CHECK_KEYS=True, CAUSAL_MASK=IS_CAUSAL, HAS_KPM=HAS_KPM, SEQ_MASKS=True, KEYS_SPLIT=KEYS_SPLIT)
    if FREE:
        acc, l_i, m_i = attend_blocks(
            acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
            free_lo, free_hi, s_hi, q_pos, offs_n, offs_d, offs_dv, qk_scale, terms,
            HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, UPCAST, PRECISION, HAS_KPM=HAS_KPM)
    acc, l_i, m_i = attend_blocks(
        acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
        free_hi, masked_hi, s_hi, q_pos, offs_n, offs_d, offs_dv, qk_scale, terms,
        HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, UPCAST, PRECISION,
        CHECK_KEYS=True, CAUSAL_MASK=IS_CAUSAL, HAS_KPM=HAS_KPM, SEQ_MASKS=True, KEYS_SPLIT=KEYS_SPLIT)
    return acc, l_i, m_i


@triton.jit
def attend_prefix_and_sequence(
    acc, l_i, m_i, q, PK, PV, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
    K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
    p_lo, p_hi, s_lo, s_hi, first_pos, last_pos, q_pos, offs_n, offs_d, offs_dv, qk_scale, terms,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, MERGE_FREE: tl.constexpr = False, KEYS_SPLIT: tl.constexpr = False,
):
    """The walk of the forward and the decode kernel: prefix keys [p_lo, p_hi) (``attend_prefix``),
    then sequence keys [s_lo, s_hi) in the ranges of ``key_ranges`` (``attend_sequence_edges``).
    PK/PV/K/V/KPM point at this (row, kv head); q_pos are the tile's query positions, in [first_pos,
    last_pos]; KEYS_SPLIT: s_hi ends a split (``key_tile_scores``). MERGE_FREE: the whole prefix blocks and the unmasked sequence blocks in one loop first
    (``attend_prefix_and_free_blocks``), then the prefix's partial block and the masked ones."""
    if MERGE_FREE:
        masked_lo, free_lo, free_hi, masked_hi = key_ranges(s_lo, s_hi, first_pos, last_pos, terms, BLOCK_N,
                                                            IS_CAUSAL)
        n_prefix_blocks = (p_hi - p_lo) // BLOCK_N
        acc, l_i, m_i = attend_prefix_and_free_blocks(
            acc, l_i, m_i, q, PK, PV, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
            K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
            p_lo, n_prefix_blocks, free_lo, n_prefix_blocks + (free_hi - free_lo) // BLOCK_N, offs_n, offs_d, offs_dv,
            qk_scale, terms, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, HAS_KPM, UPCAST, PRECISION)
        acc, l_i, m_i = attend_blocks(
            acc, l_i, m_i, q, PK, PV, stride_pkn, stride_pkd, stride_pvn, stride_pvd, KPM, 0,
            p_lo + n_prefix_blocks * BLOCK_N, p_hi, p_hi, q_pos, offs_n, offs_d, offs_dv, qk_scale, terms,
            HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, UPCAST, PRECISION, CHECK_KEYS=True)
    else:
        acc, l_i, m_i = attend_prefix(
            acc, l_i, m_i, q, PK, PV, stride_pkn, stride_pkd, stride_pvn, stride_pvd, p_lo, p_hi, q_pos, offs_n,
            offs_d, offs_dv, qk_scale, terms, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, UPCAST,
            PRECISION)
        masked_lo, free_lo, free_hi, masked_hi = key_ranges(s_lo, s_hi, first_pos, last_pos, terms, BLOCK_N,
                                                            IS_CAUSAL)
    return attend_sequence_edges(
        acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
        masked_lo, free_lo, free_hi, masked_hi, s_hi, q_pos, offs_n, offs_d, offs_dv, qk_scale, terms,
        HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, IS_CAUSAL, HAS_KPM, UPCAST, PRECISION,
        FREE=not MERGE_FREE, KEYS_SPLIT=KEYS_SPLIT)


@triton.jit
def attend_prefix_and_free_blocks(
    acc, l_i, m_i, q, PK, PV, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
    K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
    p_lo, n_prefix_blocks, free_lo, n_blocks, offs_n, offs_d, offs_dv, qk_scale, terms,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """The unmasked blocks of both key sources in ONE loop: blocks [0, n_prefix_blocks) are the whole
    prefix blocks from p_lo, the rest of the n_blocks are sequence blocks from free_lo that every
    query of the tile sees (no mask but padding). Each block picks its base pointer and row stride,
    so the software pipeline runs through the prefix into the sequence instead of draining and
    refilling between two short loops. Prefix keys have no padding: their keep mask is all true."""
    for i in range(0, n_blocks):
        in_prefix = i < n_prefix_blocks
        start_n = tl.where(in_prefix, p_lo + i * BLOCK_N, free_lo + (i - n_prefix_blocks) * BLOCK_N)
        cols = start_n + offs_n
        k_ptrs = tl.where(in_prefix, PK, K) + cols[:, None] * tl.where(in_prefix, stride_pkn, stride_kn) \
            + offs_d[None, :] * tl.where(in_prefix, stride_pkd, stride_kd)
        v_ptrs = tl.where(in_prefix, PV, V) + cols[:, None] * tl.where(in_prefix, stride_pvn, stride_vn) \
            + offs_dv[None, :] * tl.where(in_prefix, stride_pvd, stride_vd)
        k = load_tile(k_ptrs, cols, 0, offs_d, HEAD_DIM, HEAD_DIM_PAD, False, UPCAST)
        if terms.SOFTCAP:
            s, _ = capped_scores(q, k, qk_scale, terms.softcap2, PRECISION)
            s_scale = 1.0
        else:  # the scale is applied after the row max (online_softmax_step_scaled)
            s = mm(q, tl.trans(k), PRECISION)
            s_scale = qk_scale
        if HAS_KPM:
            seq_end = tl.where(in_prefix, 0, start_n + BLOCK_N)  # prefix blocks: no key loaded, all kept
            keep = tl.load(KPM + cols * stride_mn, mask=cols < seq_end, other=1) != 0
            s = tl.where(keep[None, :], s, float("-inf"))
        v = load_tile(v_ptrs, cols, 0, offs_dv, HEAD_DIM_V, HEAD_DIM_V_PAD, False, UPCAST)
        acc, l_i, m_i = online_softmax_step_scaled(acc, l_i, m_i, s, s_scale, v, PRECISION)
    return acc, l_i, m_i


@triton.jit
def load_lse2(LSE, rows, n_queries):
    """The forward's LSE (log2 units); -inf (no key seen) and rows past the end -> +inf, so p = 0."""
    lse = tl.load(LSE + rows, mask=rows < n_queries, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def prob(s, lse2):
    """P = exp2(s - lse2), at most 1: s is recomputed in the backward in a different tile order than
    the forward, and at logits ~1e9 one fp32 ulp of s is ~128, which would otherwise give P = 2^128.
    NaN stays NaN."""
    return tl.minimum(tl.exp2(s - lse2), 1.0, propagate_nan=tl.PropagateNan.ALL)
