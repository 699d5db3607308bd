"""Triton forward of prefix attention: one online softmax over the prefix and the sequence.

Per (query block, batch row, query head) program: the prefix keys come first (full blocks without
any mask, then one tail block masked to P), then the sequence keys (blocks that every query of the
tile may see without a mask, then the blocks across the causal diagonal / past M with the mask):
``tiles.attend_prefix_and_sequence``. For D <= 64 the whole prefix blocks and the unmasked sequence
blocks are one loop, each block picking its base pointer (``MERGE_FREE``:
``tiles.attend_prefix_and_sequence_merged``, the score scale applied after the row max where there
is no softcap); the masked blocks follow.
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

from prefix_kernels.kernels.tiles import attend_prefix_and_sequence, finish_rows, load_tile, program_heads, sink_logit2


@triton.jit
def start_softmax(SINKS, h, BLOCK_M: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr,
                  HAS_SINKS: tl.constexpr):
    """The online-softmax state (m, l, acc) of a query tile before any key: empty, or (HAS_SINKS) the
    head's sink logit as its first score: running max = sink, sum = exp2(0) = 1."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    if HAS_SINKS:
        m_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE) + sink_logit2(SINKS, h, True, ACC_DTYPE)
        l_i = l_i + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V_PAD], dtype=ACC_DTYPE)
    return m_i, l_i, acc


@triton.jit
def store_rows(Out, LSE, out_strides, lse_strides, b, h, offs_m, offs_dv, acc, l_i, m_i, n_queries,
               HEAD_DIM_V: tl.constexpr):
    """The finished rows of one (row, query head): out in Out's dtype, lse (log2 units) in fp32."""
    stride_ob, stride_oh, stride_om, stride_od = out_strides
    stride_lb, stride_lh = lse_strides
    out, lse = finish_rows(acc, l_i, m_i)
    row_ok = offs_m < n_queries
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse.to(tl.float32), mask=row_ok)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def prefix_attention_fwd_kernel(
    Q, K, V, PK, PV, PREFIX_IDS, KPM, Out, LSE,
    q_strides, k_strides, v_strides, pk_strides, pv_strides, kpm_strides, out_strides, lse_strides,
    n_heads, n_queries, n_keys, n_prefix, group, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_PREFIX_IDS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, terms,
):
    """One (query block, row, query head); ``terms``: the score terms (plan.ScoreArgs, kernels/tiles.py)."""
    stride_qb, stride_qh, stride_qm, stride_qd = q_strides
    stride_kb, stride_kh, stride_kn, stride_kd = k_strides
    stride_vb, stride_vh, stride_vn, stride_vd = v_strides
    stride_pkt, stride_pkh, stride_pkn, stride_pkd = pk_strides
    stride_pvt, stride_pvh, stride_pvn, stride_pvd = pv_strides
    stride_mb, stride_mn = kpm_strides
    start_m = tl.program_id(0) * BLOCK_M
    b, h, g, t = program_heads(tl.program_id(1), n_heads, group, PREFIX_IDS, HAS_PREFIX_IDS)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
    q = load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                  offs_m, n_queries, offs_d, HEAD_DIM, HEAD_DIM_PAD, True, UPCAST)
    m_i, l_i, acc = start_softmax(terms.sinks, h, BLOCK_M, HEAD_DIM_V_PAD, ACC_DTYPE, terms.HAS_SINKS)
    # Query i sits at position n_keys - n_queries + i (bottom-right causal). D <= 64: the whole prefix
    # blocks and the unmasked sequence blocks in one loop (one software pipeline, fewer registers than
    # two short loops); D = 128: separate loops, which need fewer registers than the merged one there.
    first_pos = n_keys - n_queries + start_m
    acc, l_i, m_i = attend_prefix_and_sequence(
        acc, l_i, m_i, q, PK + t * stride_pkt + g * stride_pkh, PV + t * stride_pvt + g * stride_pvh,
        stride_pkn, stride_pkd, stride_pvn, stride_pvd,
        K + b * stride_kb + g * stride_kh, V + b * stride_vb + g * stride_vh, stride_kn, stride_kd, stride_vn,
        stride_vd, KPM + b * stride_mb, stride_mn,
        0, n_prefix, 0, n_keys, first_pos, first_pos + BLOCK_M - 1, first_pos + offs_m - start_m, offs_n, offs_d,
        offs_dv, qk_scale, terms, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, IS_CAUSAL, HAS_KPM,
        UPCAST, PRECISION, MERGE_FREE=HEAD_DIM_PAD <= 64)
    store_rows(Out, LSE, out_strides, lse_strides, b, h, offs_m, offs_dv, acc, l_i, m_i, n_queries, HEAD_DIM_V)
