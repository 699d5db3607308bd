// prefix_kernels C++ CPU op: parameters shared by the ATen-facing registration file
// (prefix_attention.cpp) and the ATen-free kernel files (kernel_base.cpp, kernel_avx2.cpp).
//
// The kernel files include no torch headers: they compile in seconds and can be built twice,
// once for baseline x86-64 and once with AVX2+FMA enabled, and the registration file picks one
// at run time (no -march=native).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

namespace prefix_kernels_cpu {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Row-major GEMM on raw pointers: C[m,n] = alpha * op(A)[m,k] @ op(B)[k,n] + beta * C.
// op(X) = X^T when the flag is set; lda/ldb/ldc are row strides (in elements) of the stored
// matrices. Provided by the registration file (MKL/BLAS when torch exports it, else ATen).
using SGemmFn = void (*)(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                         const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                         float* c, int64_t ldc);
using DGemmFn = void (*)(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                         const double* a, int64_t lda, const double* b, int64_t ldb, double beta,
                         double* c, int64_t ldc);

// A 4-D strided view (strides in elements). Lower-rank tensors are padded with leading stride 0.
struct TensorRef {
  const void* data = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
};

struct MutRef {
  void* data = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
};

struct Params {
  DType dtype = DType::kFloat32;
  int64_t B = 0, Hq = 0, Hkv = 0, G = 1, N = 0, M = 0, P = 0, D = 0, Dv = 0, T = 1;
  bool causal = true;
  double scale = 1.0;
  // Sliding window W (0 = none): the query at position i sees sequence key j only if
  // i - W < j (and j < i + W when not causal). The prefix stays visible.
  int64_t window = 0;
  double softcap = 0;                // c > 0: every score s becomes c * tanh(s / c); 0 = none
  const void* sinks = nullptr;       // [Hq] contiguous, accumulation dtype; null = no sinks

  TensorRef q, k, v, pk, pv;         // q/k [.., D], v [.., Dv]; pk/pv viewed as [T, Hkv, P, D / Dv]
                                     // (T stride 0 when shared)
  const uint8_t* kpm = nullptr;      // key padding mask [B, M], nonzero = attend; may be null
  int64_t kpm_s0 = 0, kpm_s1 = 0;
  const int64_t* ids = nullptr;      // prefix ids [B], contiguous; null = prefix 0 for every row

  // forward outputs
  MutRef out;                        // [B, Hq, N, Dv], q's dtype
  void* lse = nullptr;               // [B, Hq, N] contiguous, float (double for fp64 inputs)

  // backward inputs
  TensorRef dout, o;                 // [B, Hq, N, Dv]
  const void* lse_in = nullptr;      // [B, Hq, N] contiguous, same type as lse
  // backward outputs (null = not needed)
  MutRef dq, dk, dv;                 // dq like q, dk/dv like k/v, input dtype
  MutRef dpk, dpv;                   // like prefix_k/prefix_v, viewed as [T, Hkv, P, D]

  // Backward chunks (prefix gradients): the rows of the batch, ordered by prefix id then row, cut
  // into n_chunks chunks that never span two prefixes; one task per (chunk, kv head) handles the
  // chunk's rows in order and sums their prefix gradients into one [P, D] accumulator. The cut
  // depends on the problem's shape (and prefix_ids) only, never on the thread count.
  int64_t n_chunks = 0;
  const int64_t* chunk_rows = nullptr;   // [B] row indices, chunk c = chunk_rows[chunk_off[c] .. chunk_off[c+1])
  const int64_t* chunk_off = nullptr;    // [n_chunks + 1]
  const int64_t* prefix_chunks = nullptr;  // [T + 1]: the chunks of prefix t are [prefix_chunks[t], prefix_chunks[t+1])
  // Chunk c's partial slot, or -1 when c is its prefix's only chunk (the task then writes
  // dpk/dpv itself). Partials: [n_parts, Hkv, P, D] (dpv: Dv) contiguous, accumulation dtype, summed per
  // prefix in chunk order by reduce_prefix.
  const int64_t* chunk_part = nullptr;
  void* dpk_part = nullptr;
  void* dpv_part = nullptr;

  // Cascade forward (shared-prefix decode; prefix_attention.cpp decides, see plan_cascade): the
  // rows ordered by prefix id, then row (casc_rows [B]), cut into casc_n chunks
  // casc_rows[casc_off[c] .. casc_off[c+1]) that never span two prefixes. One task per (chunk, kv
  // head) runs the prefix part of all the chunk's rows at once: their G * N query rows each are
  // stacked into one matrix, multiplied against the prefix tiles through sgemm / dgemm, with one
  // online softmax per query row. It leaves each query's softmax state in casc_m / casc_l
  // ([B, Hq, N]: running max and sum, log2 domain) and casc_o ([B, Hq, N, Dv], unnormalized), in
  // the accumulation dtype; the per-row forward then starts from that state instead of visiting
  // the prefix tiles (the log-sum-exp merge of the two parts) and goes on with the row's own keys.
  // The cut depends on the shape and prefix_ids only: results do not depend on the thread count.
  bool cascade = false;
  int64_t casc_n = 0;
  int64_t casc_max_rows = 0;            // most batch rows in one chunk
  int64_t casc_block_k = 128;           // prefix keys per tile in the cascade
  const int64_t* casc_rows = nullptr;
  const int64_t* casc_off = nullptr;    // [casc_n + 1]
  void* casc_m = nullptr;
  void* casc_l = nullptr;
  void* casc_o = nullptr;

  int64_t block_q = 64;              // queries per task (per query head)
  int64_t block_k = 128;             // keys per tile
  int64_t num_slots = 1;             // work is dealt round-robin to this many slots

  SGemmFn sgemm = nullptr;
  DGemmFn dgemm = nullptr;
};

// One ISA flavour of the kernels (namespace base / avx2).
#define PK_DECLARE_ISA(ns)                                                      \
  namespace ns {                                                                \
  /* forward for the work slots [slot_begin, slot_end) */                       \
  void forward_slots(const Params& p, int64_t slot_begin, int64_t slot_end);    \
  /* the cascade's prefix part (Params::casc_*) for the work slots [slot_begin, slot_end) */ \
  void cascade_prefix_slots(const Params& p, int64_t slot_begin, int64_t slot_end); \
  void backward_slots(const Params& p, int64_t slot_begin, int64_t slot_end);   \
  /* dst[t, hkv] = sum of the partials of prefix t's chunks, in chunk order, for */ \
  /* the pairs t * Hkv + hkv in [pair_begin, pair_end) (single-chunk prefixes are */ \
  /* skipped: their task wrote them; prefixes no row uses get zeros) */        \
  /* (width: D for dpk, Dv for dpv) */                                        \
  void reduce_prefix(const Params& p, const void* part, MutRef dst, int64_t width, \
                     int64_t pair_begin, int64_t pair_end);                     \
  }

PK_DECLARE_ISA(base)
PK_DECLARE_ISA(avx2)

}  // namespace prefix_kernels_cpu
