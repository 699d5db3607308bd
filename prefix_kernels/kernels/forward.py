"""Triton forward of prefix attention: one online softmax over the prefix and the sequence.

Per (query block, batch row, query head) program: the prefix keys come first (full blocks without
any mask, then one tail block masked to P), then the sequence keys (blocks that every query of the
tile may see without a mask, then the blocks across the causal diagonal / past M with the mask).
Scores live in the log2 domain (``qk_scale = scale * log2(e)``), and the kernel writes the LSE in
that domain too (log2 units, ``m + log2(l)``) for the backward, which recomputes P = exp2(s - lse2)
from exactly the same fp32 numbers: a round trip through the natural log would cost up to a few
ulps of |lse|, i.e. a factor 2^(+-128) in P at logits ~1e9 (the caller converts for the user). A
row that sees no key keeps ``m = -inf``; ``m_safe`` keeps it from turning into NaN, so it ends with
out = 0 and lse = -inf.

Written for sm_80/sm_90 (compile-checked for both in the tests) and the CPU interpreter.
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
def _attend_blocks(
    acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_mn,
    lo, hi, n_keys, q_pos, offs_n, offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    CHECK_KEYS: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online-softmax update over key blocks [lo, hi); the flags choose which masks apply."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_tile(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, cols, n_keys, offs_d,
                      HEAD_DIM, HEAD_DIM_PAD, CHECK_KEYS, UPCAST)
        qk = mm(q, tl.trans(k), PRECISION) * qk_scale
        if CHECK_KEYS:
            qk = tl.where(cols[None, :] < n_keys, qk, float("-inf"))
        if CAUSAL_MASK:
            qk = tl.where(cols[None, :] <= q_pos[:, None], qk, float("-inf"))
        if HAS_KPM:
            keep = tl.load(KPM + cols * stride_mn, mask=cols < n_keys, other=0)
            qk = tl.where(keep[None, :] != 0, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, cols, n_keys, offs_d,
                      HEAD_DIM, HEAD_DIM_PAD, CHECK_KEYS, UPCAST)
        acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def prefix_attention_fwd_kernel(
    Q, K, V, PK, PV, PREFIX_IDS, KPM, Out, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkt, stride_pkh, stride_pkn, stride_pkd,
    stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    n_heads, n_queries, n_keys, n_prefix, group, qk_scale,
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

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=ACC_DTYPE)

    # Prefix: always visible. Full blocks unmasked, then the tail block masked to n_prefix.
    PK_base = PK + t * stride_pkt + g * stride_pkh
    PV_base = PV + t * stride_pvt + g * stride_pvh
    prefix_full = (n_prefix // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, PK_base, PV_base, stride_pkn, stride_pkd, stride_pvn, stride_pvd, KPM, 0,
        0, prefix_full, n_prefix, offs_m, offs_n, offs_d, qk_scale,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, False, False, False, UPCAST, PRECISION)
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, PK_base, PV_base, stride_pkn, stride_pkd, stride_pvn, stride_pvd, KPM, 0,
        prefix_full, n_prefix, n_prefix, offs_m, offs_n, offs_d, qk_scale,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, True, False, False, UPCAST, PRECISION)

    # Sequence: query i sits at position n_keys - n_queries + i (bottom-right causal).
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
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd, KPM_base, stride_mn,
        0, unmasked_end, n_keys, q_pos, offs_n, offs_d, qk_scale,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, False, False, HAS_KPM, UPCAST, PRECISION)
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd, KPM_base, stride_mn,
        unmasked_end, masked_end, n_keys, q_pos, offs_n, offs_d, qk_scale,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, True, IS_CAUSAL, HAS_KPM, UPCAST, PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))  # log2 units; NaN stays NaN
    row_ok = offs_m < n_queries
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse.to(tl.float32), mask=row_ok)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
