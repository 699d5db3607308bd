"""The pieces every Triton kernel of the package is made of: load a tile, score a tile, mask its
scores, one online-softmax step, the key (or query) ranges a tile walks, and the walk over the
prefix and then the sequence. The forward (forward.py), the decode kernel (decode.py) and the
backward (backward.py) are written with these, so a change of the attention pattern -- which keys
a query sees, how a score is formed -- is one edit here.

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
    (k, q) in the backward. The one place a score is formed."""
    return mm(a, tl.trans(b), PRECISION) * qk_scale


@triton.jit
def mask_scores(s, cols, pos, keep, n_keys, fill,
                CHECK_KEYS: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_KEEP: tl.constexpr):
    """``s`` with ``fill`` where a query may not see a key. ``cols`` (key index), ``pos`` (query
    position) and ``keep`` (bool, e.g. the padding mask) come broadcast to s's shape: [1, N] / [M, 1]
    for a [queries, keys] tile, the other way round for a transposed one. CHECK_KEYS: key < n_keys;
    CAUSAL_MASK: key <= position; HAS_KEEP: keep."""
    if CHECK_KEYS:
        s = tl.where(cols < n_keys, s, fill)
    if CAUSAL_MASK:
        s = tl.where(cols <= pos, s, fill)
    if HAS_KEEP:
        s = tl.where(keep, s, fill)
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
def finish_rows(acc, l_i, m_i):
    """(out, lse in log2 units) of finished online-softmax rows; a row that saw no key gets out = 0,
    lse = -inf. NaN stays NaN."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    return acc / l_safe[:, None], lse


@triton.jit
def unmasked_keys_end(lo, hi, first_pos, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """End of the whole BLOCK_N blocks of sequence keys [lo, hi) that every query of a tile sees
    without a mask, when its first (lowest) query position is ``first_pos``: keys j <= first_pos
    when causal, all of them otherwise. Past it, blocks need the masks."""
    if IS_CAUSAL:
        free = tl.minimum(hi, first_pos + 1)
    else:
        free = hi
    return lo + tl.maximum(free - lo, 0) // BLOCK_N * BLOCK_N


@triton.jit
def visible_keys_end(n_keys, last_pos, IS_CAUSAL: tl.constexpr):
    """One past the last sequence key that a query at position <= last_pos can see."""
    if IS_CAUSAL:
        return tl.minimum(last_pos + 1, n_keys)
    else:
        return n_keys


@triton.jit
def query_blocks_seeing(start_n, n_queries, key_offset, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                        IS_CAUSAL: tl.constexpr):
    """The query blocks that see sequence keys [start_n, start_n + BLOCK_N) (query i sits at
    position key_offset + i), as (lo, mid, full_end, tail, end): [lo, mid) cross the causal
    diagonal (causal mask), [mid, full_end) see every key of the block, [tail, end) is the ragged
    last query block (row bounds)."""
    end = tl.cdiv(n_queries, BLOCK_M) * BLOCK_M
    full_end = n_queries // BLOCK_M * BLOCK_M
    if IS_CAUSAL:
        lo = tl.maximum(start_n - key_offset, 0) // BLOCK_M * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - key_offset, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.maximum(mid, lo), end)
    else:
        lo = 0
        mid = 0
    return lo, mid, full_end, tl.maximum(mid, full_end), end


@triton.jit
def attend_blocks(
    acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
    lo, hi, n_keys, q_pos, offs_n, offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    CHECK_KEYS: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online-softmax update over key blocks [lo, hi) of one key source; the flags choose the masks."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_tile(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, cols, n_keys, offs_d,
                      HEAD_DIM, HEAD_DIM_PAD, CHECK_KEYS, UPCAST)
        keep = cols[None, :] >= 0  # unused unless HAS_KPM
        if HAS_KPM:
            keep = load_keep(KPM, stride_mn, cols, n_keys)[None, :]
        qk = mask_scores(scores(q, k, qk_scale, PRECISION), cols[None, :], q_pos[:, None], keep, n_keys,
                         float("-inf"), CHECK_KEYS, CAUSAL_MASK, HAS_KPM)
        v = load_tile(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, cols, n_keys, offs_d,
                      HEAD_DIM, HEAD_DIM_PAD, CHECK_KEYS, UPCAST)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, PRECISION)
    return acc, l_i, m_i


@triton.jit
def attend_prefix_and_sequence(
    acc, l_i, m_i, q, PK, PV, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
    K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
    p_lo, p_hi, s_lo, s_hi, first_pos, q_pos, offs_n, offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """The walk of the forward and the decode kernel: prefix keys [p_lo, p_hi) (always visible: whole
    blocks unmasked, then one block masked to p_hi), then sequence keys [s_lo, s_hi) (blocks every
    query sees unmasked, the rest with the causal and padding masks, bounded by s_hi). PK/PV/K/V/KPM
    point at this (row, kv head); q_pos are the tile's query positions, first_pos the lowest."""
    p_full = p_lo + (p_hi - p_lo) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = attend_blocks(
        acc, l_i, m_i, q, PK, PV, stride_pkn, stride_pkd, stride_pvn, stride_pvd, KPM, 0,
        p_lo, p_full, p_hi, q_pos, offs_n, offs_d, qk_scale,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, False, False, False, UPCAST, PRECISION)
    acc, l_i, m_i = attend_blocks(
        acc, l_i, m_i, q, PK, PV, stride_pkn, stride_pkd, stride_pvn, stride_pvd, KPM, 0,
        p_full, p_hi, p_hi, q_pos, offs_n, offs_d, qk_scale,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, True, False, False, UPCAST, PRECISION)
    unmasked_end = unmasked_keys_end(s_lo, s_hi, first_pos, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = attend_blocks(
        acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
        s_lo, unmasked_end, s_hi, q_pos, offs_n, offs_d, qk_scale,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, False, False, HAS_KPM, UPCAST, PRECISION)
    acc, l_i, m_i = attend_blocks(
        acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
        unmasked_end, s_hi, s_hi, q_pos, offs_n, offs_d, qk_scale,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, True, IS_CAUSAL, HAS_KPM, UPCAST, PRECISION)
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
