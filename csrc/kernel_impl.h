// The CPU kernels of prefix attention, written once and compiled once per ISA flavour: the
// including file defines PK_ISA (the namespace), optionally PK_VEC_BYTES (vector width, default
// 16) and PK_F16C, and may enable target features with `#pragma GCC target` around this include.
// No torch headers here.
//
// Layout of the work (the math: README.md's "The op" section; prefix_kernels/reference.py is the
// definition the kernels match):
//   forward : one task per (batch row b, kv head g, block of BQ queries). The G = Hq / Hkv query
//             heads of the group are stacked into one [G * BQ, D] matrix, so every K/V tile is
//             read once per group (GQA is never expanded in memory). One online softmax spans the
//             prefix tiles (never masked) and the sequence tiles (bottom-right causal, and the
//             sliding window). Sequence tiles are cut backwards from the last visible key, so
//             only the first one or two straddle the diagonal, down to the first key of the
//             block's window; tiles past the diagonal, before the window and all-padding tiles
//             are skipped (work ~ N * min(W, M)). Softcap applies to every score tile; the sinks
//             join each row's denominator at the end (lse includes them).
//             v / prefix_v / out rows have their own head dim Dv.
//   cascade : shared-prefix decode (Params::cascade; prefix_attention.cpp's cost model decides).
//             First one task per (chunk of rows sharing a prefix, g): the chunk's rows x G heads
//             x N queries stacked into one matrix against the prefix tiles (GEMMs through
//             Params::sgemm / dgemm, one online softmax per query row), leaving each query's
//             state (max, sum, unnormalized output) in Params::casc_*. Then the forward tasks
//             above start from that state and visit only the row's own keys: the online softmax
//             merges the two parts (their log-sum-exp), the sinks join once at the end, and out /
//             lse are the ones the backward expects (it never knows which path ran).
//   backward: one task per (chunk of rows, g); for each row of the chunk (ascending), loops over
//             query blocks, then key tiles, recomputing P = min(exp(S - lse), 1) (the clamp
//             bounds P where the fp32 lse is coarse: logits ~1e9). dK/dV of the row's sequence
//             keys and the chunk's prefix gradient [P, D] are owned by the task (no atomics).
//             Chunks never span two prefixes (Params::chunk_*); a prefix used by one chunk gets
//             its gradient written by that task, a prefix split over several chunks gets their
//             partials summed in chunk order by reduce_prefix. The chunks are cut from the shape
//             alone, so results are deterministic and independent of the thread count, and the
//             partials are O(chunks * P * D), not O(B * P * D).
//             Prefix tiles are visited only for dq / dprefix, sequence tiles only for dq / dk / dv.
//             The sinks' gradient is not computed here (prefix_attention.cpp: from out and lse).
// Tile products go through Params::sgemm / dgemm (MKL or ATen), except the forward's few-row
// (decode) tiles, done here straight from the K/V rows. Elementwise work (masking, max, exp2,
// rescaling, dS) uses GCC/Clang vector extensions. Work is dealt round-robin to Params::num_slots
// slots; a task's result never depends on its slot, so results are bit-identical for any number
// of threads.

#ifndef PK_ISA
#error "define PK_ISA before including kernel_impl.h"
#endif

#ifndef PK_F16C
#define PK_F16C 0
#endif

// Vector-typed arguments of internal inline functions: no ABI concern.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace prefix_kernels_cpu {
namespace PK_ISA {
namespace {

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

struct bf16_t { uint16_t x; };
struct f16_t { uint16_t x; };

inline float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }


// ---- dtype conversions (branch-free so loops over them vectorize) ----
inline float to_float(bf16_t v) { return f32_from_bits(uint32_t(v.x) << 16); }
inline bf16_t from_float_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;   // round to nearest even
  bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16_t{uint16_t(nan ? 0x7fc0u : r)};
}
// IEEE half <-> float, after Marat Dukhan's FP16 library (MIT).
inline float to_float(f16_t v) {
  const uint32_t w = uint32_t(v.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result =
      sign | (two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized));
  return f32_from_bits(result);
}
inline f16_t from_float_f16(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return f16_t{uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

template <typename acc_t> inline acc_t load(float v) { return acc_t(v); }
template <typename acc_t> inline acc_t load(double v) { return acc_t(v); }
template <typename acc_t> inline acc_t load(bf16_t v) { return acc_t(to_float(v)); }
template <typename acc_t> inline acc_t load(f16_t v) { return acc_t(to_float(v)); }

template <typename out_t> struct Store;
template <> struct Store<float> { static float cvt(float v) { return v; } };
template <> struct Store<double> { static double cvt(double v) { return v; } };
template <> struct Store<bf16_t> { static bf16_t cvt(float v) { return from_float_bf16(v); } };
template <> struct Store<f16_t> { static f16_t cvt(float v) { return from_float_f16(v); } };

// dst[i] = src[i * stride] * mul
template <typename in_t, typename acc_t>
inline void load_row(acc_t* dst, const in_t* src, int64_t stride, int64_t n, acc_t mul) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = load<acc_t>(src[i]) * mul;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = load<acc_t>(src[i * stride]) * mul;
  }
}
// dst[i * stride] = src[i] * mul
template <typename out_t, typename acc_t>
inline void store_row(out_t* dst, int64_t stride, const acc_t* src, int64_t n, acc_t mul) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = Store<out_t>::cvt(src[i] * mul);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = Store<out_t>::cvt(src[i] * mul);
  }
}

#if PK_F16C
// Hardware half <-> float conversion (F16C) for unit-stride rows.
template <>
inline void load_row<f16_t, float>(float* dst, const f16_t* src, int64_t stride, int64_t n, float mul) {
  int64_t i = 0;
  if (stride == 1) {
    const __m256 vm = _mm256_set1_ps(mul);
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))), vm));
  }
  for (; i < n; ++i) dst[i] = to_float(src[i * stride]) * mul;
}
template <>
inline void store_row<f16_t, float>(f16_t* dst, int64_t stride, const float* src, int64_t n, float mul) {
  int64_t i = 0;
  if (stride == 1) {
    const __m256 vm = _mm256_set1_ps(mul);
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(src + i), vm), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i * stride] = from_float_f16(src[i] * mul);
}
#endif

// ---- elementwise row operations ----
// fp32 rows use GCC/Clang vector extensions: one source that compiles to 8-float AVX2 vectors in
// kernel_avx2.cpp and to 4-float SSE2 vectors in kernel_base.cpp (PK_VEC_BYTES), with no reliance
// on the auto-vectorizer. A row's tail (n % lanes elements) goes through the same vector code on
// a padded copy. fp64 rows (gradcheck) use plain scalar loops and libm.
#ifndef PK_VEC_BYTES
#define PK_VEC_BYTES 16
#endif
typedef float vf __attribute__((vector_size(PK_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(PK_VEC_BYTES)));
constexpr int64_t kW = PK_VEC_BYTES / 4;

inline vf splat(float x) { return vf{} + x; }
inline vf loadu(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf load_tail(const float* p, int64_t n, float pad) {
  float tmp[kW];
  for (int64_t i = 0; i < kW; ++i) tmp[i] = i < n ? p[i] : pad;
  return loadu(tmp);
}
inline void store_tail(float* p, vf v, int64_t n) {
  float tmp[kW];
  storeu(tmp, v);
  for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
}
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kW; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline float hsum(vf v) {  // lanes in a fixed order
  float s = v[0];
  for (int i = 1; i < kW; ++i) s += v[i];
  return s;
}

// 2^x: Cephes' exp2f polynomial (max rel. error ~2e-7) after round-to-nearest range reduction;
// 0 for x < -126 (including -inf), NaN stays NaN, x is clamped to <= top (top = 0: the result
// is <= 1, exactly 1 for x >= 0).
inline vf exp2_v(vf x, float top = 127.0f) {
  const vf lo = splat(-126.0f), hi = splat(top), zero = splat(0.0f);
  vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vf magic = splat(12582912.0f);                // 1.5 * 2^23: rounds to an integer
  const vf fi = (xc + magic) - magic;
  const vf f = xc - fi;                               // [-0.5, 0.5]
  vf p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const vi e = (__builtin_convertvector(fi, vi) + 127) << 23;
  const vf r = p * reinterpret_cast<const vf&>(e);
  return x < lo ? zero : r;
}
inline double exp2_acc(double x) { return std::exp2(x); }
inline float exp2_acc(float x) {
  vf v = exp2_v(splat(x));
  return v[0];
}

// x rounded toward -inf to acc_t (a no-op for double).
template <typename acc_t> inline acc_t round_down(double x);
template <> inline double round_down<double>(double x) { return x; }
template <> inline float round_down<float>(double x) {
  const float f = float(x);
  return double(f) > x ? std::nextafter(f, -std::numeric_limits<float>::infinity()) : f;
}

inline double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
inline float row_max(const float* x, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  vf m = splat(ninf);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) m = vmax(m, loadu(x + i));
  if (i < n) m = vmax(m, load_tail(x + i, n - i, ninf));
  return hmax(m);
}

// x[i] = 2^(x[i] - sub); returns the sum (in a fixed order: deterministic)
inline double exp2_sub_sum(double* x, int64_t n, double sub) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp2(x[i] - sub);
    s += x[i];
  }
  return s;
}
inline float exp2_sub_sum(float* x, int64_t n, float sub) {
  const vf vs = splat(sub);
  vf acc = splat(0.0f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const vf e = exp2_v(loadu(x + i) - vs);
    storeu(x + i, e);
    acc += e;
  }
  if (i < n) {
    const vf e = exp2_v(load_tail(x + i, n - i, -std::numeric_limits<float>::infinity()) - vs);
    store_tail(x + i, e, n - i);
    acc += e;  // padded lanes are 2^-inf = 0
  }
  return hsum(acc);
}

// x[i] = min(2^(x[i] - sub), 1): the backward's P. sub is the row's lse (log2 domain), so P <= 1
// in exact arithmetic; the clamp keeps it there when the fp32 lse is coarser than 1 (huge
// logits). NaN stays NaN.
inline void exp2_sub_le1(double* x, int64_t n, double sub) {
  for (int64_t i = 0; i < n; ++i) {
    const double d = x[i] - sub;
    x[i] = std::exp2(d > 0 ? 0.0 : d);
  }
}
inline void exp2_sub_le1(float* x, int64_t n, float sub) {
  const vf vs = splat(sub);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) storeu(x + i, exp2_v(loadu(x + i) - vs, 0.0f));
  if (i < n) store_tail(x + i, exp2_v(load_tail(x + i, n - i, 0.0f) - vs, 0.0f), n - i);
}

// dp[i] = p[i] * (dp[i] - delta)
template <typename acc_t>
inline void ds_row(acc_t* dp, const acc_t* p, int64_t n, acc_t delta) {
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - delta);
}
inline void ds_row(float* dp, const float* p, int64_t n, float delta) {
  const vf vd = splat(delta);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) storeu(dp + i, loadu(p + i) * (loadu(dp + i) - vd));
  for (; i < n; ++i) dp[i] = p[i] * (dp[i] - delta);
}

// Softcap (Gemma 2) of a score row: x[i] = cap * tanh(x[i] / cap); dcap[i] = 1 - tanh^2, the
// derivative, when dcap is not null. fp32: Cephes' tanhf (relative error ~2e-7, so a capped score
// is as exact as an uncapped one whatever the cap): an odd polynomial for |a| < 0.625, else
// 1 - 2 / (e^(2|a|) + 1) through exp2_v; fp64: libm.
inline void softcap_row(double* x, int64_t n, double cap, double* dcap) {
  for (int64_t i = 0; i < n; ++i) {
    const double t = std::tanh(x[i] / cap);
    x[i] = cap * t;
    if (dcap != nullptr) dcap[i] = 1.0 - t * t;
  }
}
inline vf tanh_v(vf x) {
  const vf zero = splat(0.0f);
  const vf ax = x < zero ? -x : x;
  const vf big = 1.0f - 2.0f / (exp2_v(ax * float(2.0 * kLog2e)) + 1.0f);
  const vf z = x * x;
  vf poly = splat(-5.70498872745e-3f);
  poly = poly * z + 2.06390887954e-2f;
  poly = poly * z - 5.37397155531e-2f;
  poly = poly * z + 1.33314422036e-1f;
  poly = poly * z - 3.33332819422e-1f;
  const vf small = poly * z * x + x;
  return ax < splat(0.625f) ? small : (x < zero ? -big : big);
}
inline void softcap_row(float* x, int64_t n, float cap, float* dcap) {
  const vf vc = splat(cap), vinv = splat(1.0f / cap);
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t m = std::min<int64_t>(kW, n - i);
    const vf t = tanh_v((m == kW ? loadu(x + i) : load_tail(x + i, m, 0.0f)) * vinv);
    const vf d = 1.0f - t * t;
    if (m == kW) {
      storeu(x + i, vc * t);
      if (dcap != nullptr) storeu(dcap + i, d);
    } else {
      store_tail(x + i, vc * t, m);
      if (dcap != nullptr) store_tail(dcap + i, d, m);
    }
  }
}

// x[i] *= y[i]
template <typename acc_t>
inline void mul_row(acc_t* x, const acc_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= y[i];
}

template <typename acc_t>
inline void scale_row(acc_t* x, int64_t n, acc_t a) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}
inline void scale_row(float* x, int64_t n, float a) {
  const vf va = splat(a);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) storeu(x + i, loadu(x + i) * va);
  for (; i < n; ++i) x[i] *= a;
}

inline double dot_row(const double* a, const double* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}
inline float dot_row(const float* a, const float* b, int64_t n) {
  vf acc = splat(0.0f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) acc += loadu(a + i) * loadu(b + i);
  if (i < n) acc += load_tail(a + i, n - i, 0.0f) * load_tail(b + i, n - i, 0.0f);
  return hsum(acc);
}

// Tile products for a handful of stacked query rows (decode: N = 1, R = G rows): BLAS would
// spend most of its time packing the K/V tile, which is read only once here, straight from the
// input (memory bound, like the op itself).
constexpr int64_t kSmallRows = 8;
constexpr int64_t kPrefetchRows = 16;

// Software prefetch of a row kPrefetchRows ahead: K/V rows of one head are often far apart (HF's
// [B, S, H, D] storage), few per 4 KiB page, which the hardware prefetchers do not follow.
inline void prefetch_row(const float* row, int64_t D) {
  for (int64_t c = 0; c < D; c += 16) __builtin_prefetch(row + c);
}

// S[R, nk] = A[R, D] @ K[nk, D]^T (A rows contiguous, K rows ldk apart)
inline void small_nt(int64_t R, int64_t nk, int64_t D, const float* A, const float* K, int64_t ldk,
                     float* S) {
  const int64_t Dv = D / kW * kW;
  for (int64_t j = 0; j < nk; ++j) {
    const float* kr = K + j * ldk;
    if (j + kPrefetchRows < nk) prefetch_row(kr + kPrefetchRows * ldk, D);
    for (int64_t r = 0; r < R; ++r) {
      const float* a = A + r * D;
      vf acc = splat(0.0f);
      for (int64_t c = 0; c < Dv; c += kW) acc += loadu(a + c) * loadu(kr + c);
      float s = hsum(acc);
      for (int64_t c = Dv; c < D; ++c) s += a[c] * kr[c];
      S[r * nk + j] = s;
    }
  }
}

// O[R, D] += P[R, nk] @ V[nk, D] (V rows ldv apart)
inline void small_nn(int64_t R, int64_t nk, int64_t D, const float* P, const float* V, int64_t ldv,
                     float* O) {
  const int64_t Dv = D / kW * kW;
  for (int64_t j = 0; j < nk; ++j) {
    const float* vr = V + j * ldv;
    if (j + kPrefetchRows < nk) prefetch_row(vr + kPrefetchRows * ldv, D);
    for (int64_t r = 0; r < R; ++r) {
      const float pj = P[r * nk + j];
      const vf vp = splat(pj);
      float* o = O + r * D;
      for (int64_t c = 0; c < Dv; c += kW) storeu(o + c, loadu(o + c) + vp * loadu(vr + c));
      for (int64_t c = Dv; c < D; ++c) o[c] += pj * vr[c];
    }
  }
}

template <typename acc_t>
inline void fill(acc_t* x, int64_t n, acc_t v) {
  for (int64_t i = 0; i < n; ++i) x[i] = v;
}

inline void gemm(const Params& p, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  p.sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void gemm(const Params& p, bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
                 const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
                 int64_t ldc) {
  p.dgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Aligned scratch memory, freed on scope exit.
template <typename T>
struct Scratch {
  T* ptr = nullptr;
  explicit Scratch(int64_t n) {
    size_t bytes = size_t(n > 0 ? n : 1) * sizeof(T);
    bytes = (bytes + 63) / 64 * 64;
    ptr = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (ptr == nullptr) throw std::bad_alloc();
  }
  ~Scratch() { std::free(ptr); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

inline int64_t round_up16(int64_t n) { return (n + 15) / 16 * 16; }

template <typename in_t, typename acc_t>
struct Attention {
  const Params& p;
  const int64_t D, Dv, G, BQ, BK, nqb, R_max;
  const acc_t qscale;   // scale * log2(e): scores come out in the log2 domain
  const acc_t cap2;     // softcap * log2(e) (the cap in the log2 domain); 0 = no softcap
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  explicit Attention(const Params& params)
      : p(params), D(params.D), Dv(params.Dv), G(params.G), BQ(params.block_q), BK(params.block_k),
        nqb(params.N > 0 ? (params.N + params.block_q - 1) / params.block_q : 0),
        R_max(params.G * params.block_q), qscale(acc_t(params.scale * kLog2e)),
        cap2(acc_t(params.softcap * kLog2e)) {}

  static bool ld_ok(int64_t ld, int64_t d) { return ld >= d && ld <= 0x7fffffff; }

  // Rows [row0, row0 + n) of t[i0, i1] (rows of `width` elements) as a row-major acc_t matrix
  // with leading dimension *ld: the input itself when it already is one, else packed into buf.
  const acc_t* tile(const TensorRef& t, int64_t i0, int64_t i1, int64_t row0, int64_t n,
                    int64_t width, acc_t* buf, int64_t* ld) const {
    const in_t* base = static_cast<const in_t*>(t.data) + i0 * t.s[0] + i1 * t.s[1] + row0 * t.s[2];
    if constexpr (std::is_same<in_t, acc_t>::value) {
      if (t.s[3] == 1 && ld_ok(t.s[2], width)) {
        *ld = t.s[2];
        return base;
      }
    }
    for (int64_t r = 0; r < n; ++r)
      load_row<in_t, acc_t>(buf + r * width, base + r * t.s[2], t.s[3], width, acc_t(1));
    *ld = width;
    return buf;
  }

  // Stacks the query rows (of `width` elements) of the group's G heads: row r = hh * nq + i.
  void pack_rows(const TensorRef& t, int64_t b, int64_t hkv, int64_t i0, int64_t nq, int64_t width,
                 acc_t* dst, acc_t mul) const {
    for (int64_t hh = 0; hh < G; ++hh) {
      const int64_t h = hkv * G + hh;
      const in_t* base = static_cast<const in_t*>(t.data) + b * t.s[0] + h * t.s[1];
      for (int64_t i = 0; i < nq; ++i)
        load_row<in_t, acc_t>(dst + (hh * nq + i) * width, base + (i0 + i) * t.s[2], t.s[3], width, mul);
    }
  }

  // Padding of keys [j0, j0 + nk) of row b: returns the number of visible keys and fills
  // `hidden` with the hidden column indices (only when some are hidden).
  int64_t padding(int64_t b, int64_t j0, int64_t nk, int32_t* hidden, int64_t* n_hidden) const {
    *n_hidden = 0;
    if (p.kpm == nullptr) return nk;
    const uint8_t* m = p.kpm + b * p.kpm_s0 + j0 * p.kpm_s1;
    int64_t nh = 0;
    for (int64_t c = 0; c < nk; ++c)
      if (m[c * p.kpm_s1] == 0) hidden[nh++] = int32_t(c);
    *n_hidden = nh;
    return nk - nh;
  }

  // The sequence keys [key_lo(i), key_hi(i)) the query at position i may see (before padding):
  // bottom-right causal and/or the sliding window.
  int64_t key_lo(int64_t i) const { return p.window > 0 ? i - p.window + 1 : 0; }
  int64_t key_hi(int64_t i) const {
    return p.causal ? i + 1 : (p.window > 0 ? i + p.window : p.M);
  }

  // Calls f(j0, nk, bounded, n_hidden) for the key tiles the queries at positions
  // [qpos0, qpos0 + nq) of row b see, in a fixed order (forward and backward cut the same tiles):
  // backwards from the last visible key, so the causal diagonal sits in the first tile, and down
  // to the first key of the earliest query's window (tiles no query sees are never visited, so
  // the work grows with the window, not with M). All-padding tiles are skipped. `bounded`: some
  // query of the block sees only part of the tile (apply_masks must cut its rows).
  template <typename F>
  void for_each_key_tile(int64_t b, int64_t qpos0, int64_t nq, int32_t* hidden, F&& f) const {
    const int64_t lo = std::max<int64_t>(0, key_lo(qpos0)), hi = std::min(p.M, key_hi(qpos0 + nq - 1));
    for (int64_t end = hi; end > lo; end -= BK) {
      const int64_t j0 = std::max(lo, end - BK), nk = end - j0;
      int64_t n_hidden = 0;
      if (padding(b, j0, nk, hidden, &n_hidden) == 0) continue;  // all padding: no weight
      const bool bounded = j0 < key_lo(qpos0 + nq - 1) || end > key_hi(qpos0);
      f(j0, nk, bounded, n_hidden);
    }
  }

  // -inf on the hidden columns and, for bounded tiles, outside each query's [key_lo, key_hi).
  void apply_masks(acc_t* S, int64_t nq, int64_t nk, int64_t j0, int64_t qpos0, bool bounded,
                   const int32_t* hidden, int64_t n_hidden) const {
    for (int64_t hh = 0; hh < G; ++hh) {
      for (int64_t i = 0; i < nq; ++i) {
        acc_t* s = S + (hh * nq + i) * nk;
        for (int64_t c = 0; c < n_hidden; ++c) s[hidden[c]] = ninf;
        if (bounded) {
          const int64_t c_lo = std::clamp<int64_t>(key_lo(qpos0 + i) - j0, 0, nk);
          const int64_t c_hi = std::clamp<int64_t>(key_hi(qpos0 + i) - j0, c_lo, nk);
          fill(s, c_lo, ninf);
          fill(s + c_hi, nk - c_hi, ninf);
        }
      }
    }
  }

  // S[R, nk] = the scores (log2 domain) of the R = G * nq stacked query rows Qs against the keys
  // Kp: softcapped (dcap[R, nk] := the softcap's derivative when dcap is not null), then masked.
  // The forward and the backward compute their scores here, the same way (with the same
  // product for few-row tiles): where the fp32 lse is coarse (huge logits) the backward's P then
  // still comes out right for the row's top keys.
  void scores(const acc_t* Qs, int64_t nq, const acc_t* Kp, int64_t ldk, int64_t nk, int64_t j0,
              int64_t qpos0, bool bounded, const int32_t* hidden, int64_t n_hidden, acc_t* S,
              acc_t* dcap) const {
    const int64_t R = G * nq;
    constexpr bool fp32 = std::is_same<acc_t, float>::value;
    const bool small = fp32 && R <= kSmallRows;
    if constexpr (fp32) {
      if (small) small_nt(R, nk, D, Qs, Kp, ldk, S);
    }
    if (!small) gemm(p, false, true, R, nk, D, acc_t(1), Qs, D, Kp, ldk, acc_t(0), S, nk);
    if (cap2 > acc_t(0))
      for (int64_t r = 0; r < R; ++r) softcap_row(S + r * nk, nk, cap2, dcap ? dcap + r * nk : nullptr);
    if (bounded || n_hidden > 0) apply_masks(S, nq, nk, j0, qpos0, bounded, hidden, n_hidden);
  }

  int64_t prefix_of(int64_t b) const { return p.ids != nullptr ? p.ids[b] : 0; }

  // ------------------------------------------------------------------ forward
  struct FwdWs {
    acc_t *Qs, *S, *O, *m, *l, *Kb, *Vb;
    int32_t* hidden;
  };

  // A forward workspace for up to R stacked query rows and key tiles of up to bk keys.
  struct FwdBuf {
    Scratch<acc_t> buf;
    Scratch<int32_t> hidden;
    FwdWs w;
    FwdBuf(int64_t R, int64_t bk, int64_t D, int64_t Dv)
        : buf(round_up16(R * D) + round_up16(R * Dv) + round_up16(R * bk) + 2 * round_up16(R) +
              round_up16(bk * D) + round_up16(bk * Dv)),
          hidden(bk) {
      w.Qs = buf.ptr;
      w.O = w.Qs + round_up16(R * D);
      w.S = w.O + round_up16(R * Dv);
      w.m = w.S + round_up16(R * bk);
      w.l = w.m + round_up16(R);
      w.Kb = w.l + round_up16(R);
      w.Vb = w.Kb + round_up16(bk * D);
      w.hidden = hidden.ptr;
    }
  };

  void forward_block(FwdWs& w, int64_t nq, const acc_t* Kp, int64_t ldk, const acc_t* Vp,
                     int64_t ldv, int64_t nk, int64_t j0, int64_t qpos0, bool bounded,
                     int64_t n_hidden) const {
    const int64_t R = G * nq;
    scores(w.Qs, nq, Kp, ldk, nk, j0, qpos0, bounded, w.hidden, n_hidden, w.S, nullptr);
    for (int64_t r = 0; r < R; ++r) {
      acc_t* s = w.S + r * nk;
      const acc_t mx = row_max(s, nk);
      const acc_t m_new = mx > w.m[r] ? mx : w.m[r];
      const acc_t m_use = m_new == ninf ? acc_t(0) : m_new;  // row sees nothing yet: P = 0
      const acc_t alpha = exp2_acc(w.m[r] - m_use);
      const acc_t rs = exp2_sub_sum(s, nk, m_use);
      w.l[r] = w.l[r] * alpha + rs;
      w.m[r] = m_new;
      if (alpha != acc_t(1)) scale_row(w.O + r * Dv, Dv, alpha);
    }
    if constexpr (std::is_same<acc_t, float>::value) {
      if (R <= kSmallRows) {
        small_nn(R, nk, Dv, w.S, Vp, ldv, w.O);
        return;
      }
    }
    gemm(p, false, false, R, Dv, nk, acc_t(1), w.S, nk, Vp, ldv, acc_t(1), w.O, Dv);
  }

  void forward_task(FwdWs& w, int64_t b, int64_t hkv, int64_t qb) const {
    const int64_t i0 = qb * BQ, nq = std::min(BQ, p.N - i0), R = G * nq;
    pack_rows(p.q, b, hkv, i0, nq, D, w.Qs, qscale);
    int64_t ldk = 0, ldv = 0;
    if (p.cascade) {
      load_cascade_state(w, b, hkv, i0, nq);  // the prefix part, done by cascade_task
    } else {
      fill(w.O, R * Dv, acc_t(0));
      fill(w.m, R, ninf);
      fill(w.l, R, acc_t(0));
    }
    if (p.P > 0 && !p.cascade) {
      const int64_t t = prefix_of(b);
      for (int64_t p0 = 0; p0 < p.P; p0 += BK) {
        const int64_t np = std::min(BK, p.P - p0);
        const acc_t* Kp = tile(p.pk, t, hkv, p0, np, D, w.Kb, &ldk);
        const acc_t* Vp = tile(p.pv, t, hkv, p0, np, Dv, w.Vb, &ldv);
        forward_block(w, nq, Kp, ldk, Vp, ldv, np, 0, 0, false, 0);
      }
    }
    const int64_t qpos0 = p.M - p.N + i0;
    for_each_key_tile(b, qpos0, nq, w.hidden, [&](int64_t j0, int64_t nk, bool bounded, int64_t n_hidden) {
      const acc_t* Kp = tile(p.k, b, hkv, j0, nk, D, w.Kb, &ldk);
      const acc_t* Vp = tile(p.v, b, hkv, j0, nk, Dv, w.Vb, &ldv);
      forward_block(w, nq, Kp, ldk, Vp, ldv, nk, j0, qpos0, bounded, n_hidden);
    });
    acc_t* lse = static_cast<acc_t*>(p.lse);
    const acc_t* sinks = static_cast<const acc_t*>(p.sinks);
    for (int64_t hh = 0; hh < G; ++hh) {
      const int64_t h = hkv * G + hh;
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t r = hh * nq + i;
        acc_t m = w.m[r], l = w.l[r], o_scale = acc_t(1);
        if (sinks != nullptr) {  // the sink joins the denominator (log2 domain), with no value
          const acc_t s = sinks[h] * acc_t(kLog2e);
          const acc_t m_new = s > m ? s : m;
          const acc_t m_use = m_new == ninf ? acc_t(0) : m_new;
          o_scale = exp2_acc(m - m_use);
          l = l * o_scale + exp2_acc(s - m_use);
          m = m_new;
        }
        // l = 0 exactly when the row saw no key and no sink (out = 0, lse = -inf); l >= 1
        // otherwise, or NaN when its scores hold NaN / +inf, which then flows into out and lse.
        const bool seen = !(l == acc_t(0));
        const acc_t inv = seen ? o_scale / l : acc_t(0);
        in_t* dst = static_cast<in_t*>(p.out.data) + b * p.out.s[0] + h * p.out.s[1] + (i0 + i) * p.out.s[2];
        store_row<in_t, acc_t>(dst, p.out.s[3], w.O + r * Dv, Dv, inv);
        // lse is rounded down (toward -inf), and so is the backward's lse2 from it: then the
        // recomputed P = min(2^(s - lse2), 1) of the row's top key stays in [1/l, 1] even where
        // the fp32 lse is coarser than 1 (logits ~1e9), instead of collapsing to 2^-100.
        lse[(b * p.Hq + h) * p.N + i0 + i] =
            seen ? round_down<acc_t>(double(m) * kLn2 + std::log(double(l))) : ninf;
      }
    }
  }

  void forward(int64_t slot_begin, int64_t slot_end) const {
    const int64_t n_bh = p.B * p.Hkv, n_tasks = n_bh * nqb;
    if (n_tasks == 0) return;
    FwdBuf fb(R_max, BK, D, Dv);
    for (int64_t slot = slot_begin; slot < slot_end; ++slot) {
      // Round-robin over tasks ordered by decreasing query block (the causal work grows with
      // the block index), so every slot gets a similar share of heavy and light blocks.
      for (int64_t t = slot; t < n_tasks; t += p.num_slots) {
        const int64_t qb = nqb - 1 - t / n_bh, bh = t % n_bh;
        forward_task(fb.w, bh / p.Hkv, bh % p.Hkv, qb);
      }
    }
  }

  // ------------------------------------------------------------------ cascade (shared prefix)
  // Index of query i of head h, row b, in the cascade state (casc_m / casc_l; casc_o rows).
  int64_t state_index(int64_t b, int64_t h, int64_t i) const { return (b * p.Hq + h) * p.N + i; }

  // The prefix part of chunk c's rows, kv head hkv (see Params::cascade): the rows' G * N query
  // rows each stacked (row r of the chunk, head hh, query i at r * G * N + hh * N + i: pack_rows'
  // order per row), one online softmax over the prefix tiles, the state stored per query.
  void cascade_task(FwdWs& w, int64_t c, int64_t hkv) const {
    const int64_t r0 = p.casc_off[c], nrows = p.casc_off[c + 1] - r0, GN = G * p.N, R = nrows * GN;
    if (nrows == 0) return;
    for (int64_t r = 0; r < nrows; ++r) pack_rows(p.q, p.casc_rows[r0 + r], hkv, 0, p.N, D, w.Qs + r * GN * D, qscale);
    fill(w.O, R * Dv, acc_t(0));
    fill(w.m, R, ninf);
    fill(w.l, R, acc_t(0));
    const int64_t t = prefix_of(p.casc_rows[r0]), bk = p.casc_block_k;
    int64_t ldk = 0, ldv = 0;
    for (int64_t p0 = 0; p0 < p.P; p0 += bk) {
      const int64_t np = std::min(bk, p.P - p0);
      const acc_t* Kp = tile(p.pk, t, hkv, p0, np, D, w.Kb, &ldk);
      const acc_t* Vp = tile(p.pv, t, hkv, p0, np, Dv, w.Vb, &ldv);
      forward_block(w, nrows * p.N, Kp, ldk, Vp, ldv, np, 0, 0, false, 0);  // G * (nrows * N) rows
    }
    acc_t* m = static_cast<acc_t*>(p.casc_m);
    acc_t* l = static_cast<acc_t*>(p.casc_l);
    acc_t* o = static_cast<acc_t*>(p.casc_o);
    for (int64_t r = 0; r < nrows; ++r) {
      const int64_t b = p.casc_rows[r0 + r];
      for (int64_t hh = 0; hh < G; ++hh) {
        for (int64_t i = 0; i < p.N; ++i) {
          const int64_t src = r * GN + hh * p.N + i, dst = state_index(b, hkv * G + hh, i);
          m[dst] = w.m[src];
          l[dst] = w.l[src];
          std::memcpy(o + dst * Dv, w.O + src * Dv, sizeof(acc_t) * Dv);
        }
      }
    }
  }

  // The softmax state of queries [i0, i0 + nq) of (b, hkv) after the prefix, from cascade_task.
  void load_cascade_state(FwdWs& w, int64_t b, int64_t hkv, int64_t i0, int64_t nq) const {
    const acc_t* m = static_cast<const acc_t*>(p.casc_m);
    const acc_t* l = static_cast<const acc_t*>(p.casc_l);
    const acc_t* o = static_cast<const acc_t*>(p.casc_o);
    for (int64_t hh = 0; hh < G; ++hh) {
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t r = hh * nq + i, src = state_index(b, hkv * G + hh, i0 + i);
        w.m[r] = m[src];
        w.l[r] = l[src];
        std::memcpy(w.O + r * Dv, o + src * Dv, sizeof(acc_t) * Dv);
      }
    }
  }

  void cascade_prefix(int64_t slot_begin, int64_t slot_end) const {
    const int64_t n_tasks = p.casc_n * p.Hkv;
    if (n_tasks == 0) return;
    FwdBuf fb(p.casc_max_rows * G * p.N, p.casc_block_k, D, Dv);
    for (int64_t slot = slot_begin; slot < slot_end; ++slot)
      for (int64_t t = slot; t < n_tasks; t += p.num_slots) cascade_task(fb.w, t / p.Hkv, t % p.Hkv);
  }

  // ------------------------------------------------------------------ backward
  struct BwdWs {
    acc_t *Qs, *dO, *dQ, *S, *dP, *dcap, *delta, *lse2, *Kb, *Vb, *row, *dKw, *dVw, *dPKw, *dPVw;
    int32_t* hidden;
  };

  void backward_block(BwdWs& w, int64_t nq, const acc_t* Kp, int64_t ldk, const acc_t* Vp,
                      int64_t ldv, int64_t nk, int64_t j0, int64_t qpos0, bool bounded,
                      int64_t n_hidden, acc_t* dKt, int64_t lddk, acc_t* dVt, int64_t lddv,
                      bool want_dq) const {
    const int64_t R = G * nq;
    const bool need_ds = dKt != nullptr || want_dq;
    scores(w.Qs, nq, Kp, ldk, nk, j0, qpos0, bounded, w.hidden, n_hidden, w.S, need_ds ? w.dcap : nullptr);
    for (int64_t r = 0; r < R; ++r) exp2_sub_le1(w.S + r * nk, nk, w.lse2[r]);  // S := P
    if (dVt != nullptr)  // dV += P^T dO
      gemm(p, true, false, nk, Dv, R, acc_t(1), w.S, nk, w.dO, Dv, acc_t(1), dVt, lddv);
    if (!need_ds) return;
    gemm(p, false, true, R, nk, Dv, acc_t(1), w.dO, Dv, Vp, ldv, acc_t(0), w.dP, nk);  // dP = dO V^T
    for (int64_t r = 0; r < R; ++r) ds_row(w.dP + r * nk, w.S + r * nk, nk, w.delta[r]);  // dS
    if (cap2 > acc_t(0)) mul_row(w.dP, w.dcap, R * nk);  // through the softcap: dS *= 1 - tanh^2
    if (dKt != nullptr)  // dK += scale dS^T Q = ln2 * dS^T Qs
      gemm(p, true, false, nk, D, R, acc_t(kLn2), w.dP, nk, w.Qs, D, acc_t(1), dKt, lddk);
    if (want_dq)  // dQ += dS K (times scale at the end)
      gemm(p, false, false, R, D, nk, acc_t(1), w.dP, nk, Kp, ldk, acc_t(1), w.dQ, D);
  }

  // Accumulation target for dK (width D) or dV (width Dv) rows of (b, hkv): the output itself
  // when it has the accumulation dtype and unit-stride rows, else the task's workspace (copied
  // out at the end).
  acc_t* grad_target(const MutRef& g, int64_t b, int64_t hkv, int64_t width, acc_t* ws, int64_t* ld) const {
    if constexpr (std::is_same<in_t, acc_t>::value) {
      if (g.s[3] == 1 && ld_ok(g.s[2], width)) {
        acc_t* base = static_cast<acc_t*>(g.data) + b * g.s[0] + hkv * g.s[1];
        *ld = g.s[2];
        for (int64_t j = 0; j < p.M; ++j) fill(base + j * g.s[2], width, acc_t(0));
        return base;
      }
    }
    *ld = width;
    fill(ws, p.M * width, acc_t(0));
    return ws;
  }

  void flush_grad(const MutRef& g, int64_t b, int64_t hkv, int64_t width, const acc_t* src,
                  const acc_t* ws) const {
    if (src != ws) return;  // accumulated in place
    in_t* base = static_cast<in_t*>(g.data) + b * g.s[0] + hkv * g.s[1];
    for (int64_t j = 0; j < p.M; ++j)
      store_row<in_t, acc_t>(base + j * g.s[2], g.s[3], ws + j * width, width, acc_t(1));
  }

  // Stores a [P, width] prefix gradient (acc_t, contiguous) into dst[t, hkv].
  void store_prefix(const MutRef& dst, int64_t t, int64_t hkv, int64_t width, const acc_t* src) const {
    in_t* base = static_cast<in_t*>(dst.data) + t * dst.s[0] + hkv * dst.s[1];
    for (int64_t j = 0; j < p.P; ++j)
      store_row<in_t, acc_t>(base + j * dst.s[2], dst.s[3], src + j * width, width, acc_t(1));
  }

  // Chunk c's rows (ascending), kv head hkv: their dq, dk, dv, and the sum of their prefix
  // gradients (in the chunk's partial slot, or written out when the chunk is its prefix's only one).
  void backward_chunk(BwdWs& w, int64_t c, int64_t hkv) const {
    const int64_t PD = p.P * D, PDv = p.P * Dv, part = p.chunk_part[c];
    acc_t* dpk = nullptr;
    acc_t* dpv = nullptr;
    if (p.dpk.data != nullptr)
      dpk = part >= 0 ? static_cast<acc_t*>(p.dpk_part) + (part * p.Hkv + hkv) * PD : w.dPKw;
    if (p.dpv.data != nullptr)
      dpv = part >= 0 ? static_cast<acc_t*>(p.dpv_part) + (part * p.Hkv + hkv) * PDv : w.dPVw;
    if (dpk) fill(dpk, PD, acc_t(0));
    if (dpv) fill(dpv, PDv, acc_t(0));
    const int64_t i0 = p.chunk_off[c], i1 = p.chunk_off[c + 1];
    for (int64_t i = i0; i < i1; ++i) backward_row(w, p.chunk_rows[i], hkv, dpk, dpv);
    if (part < 0 && i1 > i0) {
      const int64_t t = prefix_of(p.chunk_rows[i0]);
      if (dpk) store_prefix(p.dpk, t, hkv, D, dpk);
      if (dpv) store_prefix(p.dpv, t, hkv, Dv, dpv);
    }
  }

  // Row b, kv head hkv: dq, dk, dv of the row; its prefix gradients are added to dpk / dpv.
  void backward_row(BwdWs& w, int64_t b, int64_t hkv, acc_t* dpk, acc_t* dpv) const {
    const bool need_dq = p.dq.data != nullptr, need_dk = p.dk.data != nullptr,
               need_dv = p.dv.data != nullptr;
    // The prefix tiles matter for dq and the prefix grads; the sequence tiles for dq, dk, dv.
    const bool do_prefix = p.P > 0 && (need_dq || dpk || dpv);
    const bool do_seq = p.M > 0 && (need_dq || need_dk || need_dv);
    int64_t lddk = D, lddv = Dv;
    acc_t* dK = need_dk ? grad_target(p.dk, b, hkv, D, w.dKw, &lddk) : nullptr;
    acc_t* dV = need_dv ? grad_target(p.dv, b, hkv, Dv, w.dVw, &lddv) : nullptr;
    const acc_t* lse = static_cast<const acc_t*>(p.lse_in);
    const acc_t pinf = std::numeric_limits<acc_t>::infinity();
    int64_t ldk = 0, ldv = 0;

    for (int64_t qb = 0; qb < nqb && (do_prefix || do_seq); ++qb) {
      const int64_t i0 = qb * BQ, nq = std::min(BQ, p.N - i0), R = G * nq;
      pack_rows(p.q, b, hkv, i0, nq, D, w.Qs, qscale);
      pack_rows(p.dout, b, hkv, i0, nq, Dv, w.dO, acc_t(1));
      for (int64_t hh = 0; hh < G; ++hh) {
        const int64_t h = hkv * G + hh;
        const in_t* obase = static_cast<const in_t*>(p.o.data) + b * p.o.s[0] + h * p.o.s[1];
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t r = hh * nq + i;
          load_row<in_t, acc_t>(w.row, obase + (i0 + i) * p.o.s[2], p.o.s[3], Dv, acc_t(1));
          w.delta[r] = dot_row(w.dO + r * Dv, w.row, Dv);
          const acc_t l = lse[(b * p.Hq + h) * p.N + i0 + i];
          // A row that saw nothing (lse = -inf): P = 2^(s - inf) = 0, so all its grads are 0.
          w.lse2[r] = l == ninf ? pinf : round_down<acc_t>(double(l) * kLog2e);
        }
      }
      if (need_dq) fill(w.dQ, R * D, acc_t(0));
      if (do_prefix) {
        const int64_t t = prefix_of(b);
        for (int64_t p0 = 0; p0 < p.P; p0 += BK) {
          const int64_t np = std::min(BK, p.P - p0);
          const acc_t* Kp = tile(p.pk, t, hkv, p0, np, D, w.Kb, &ldk);
          const acc_t* Vp = tile(p.pv, t, hkv, p0, np, Dv, w.Vb, &ldv);
          backward_block(w, nq, Kp, ldk, Vp, ldv, np, 0, 0, false, 0,
                         dpk ? dpk + p0 * D : nullptr, D, dpv ? dpv + p0 * Dv : nullptr, Dv, need_dq);
        }
      }
      if (do_seq) {
        const int64_t qpos0 = p.M - p.N + i0;
        for_each_key_tile(b, qpos0, nq, w.hidden, [&](int64_t j0, int64_t nk, bool bounded, int64_t n_hidden) {
          const acc_t* Kp = tile(p.k, b, hkv, j0, nk, D, w.Kb, &ldk);
          const acc_t* Vp = tile(p.v, b, hkv, j0, nk, Dv, w.Vb, &ldv);
          backward_block(w, nq, Kp, ldk, Vp, ldv, nk, j0, qpos0, bounded, n_hidden,
                         dK ? dK + j0 * lddk : nullptr, lddk, dV ? dV + j0 * lddv : nullptr, lddv,
                         need_dq);
        });
      }
      if (need_dq) {
        const acc_t sc = acc_t(p.scale);
        for (int64_t hh = 0; hh < G; ++hh) {
          const int64_t h = hkv * G + hh;
          in_t* base = static_cast<in_t*>(p.dq.data) + b * p.dq.s[0] + h * p.dq.s[1];
          for (int64_t i = 0; i < nq; ++i)
            store_row<in_t, acc_t>(base + (i0 + i) * p.dq.s[2], p.dq.s[3], w.dQ + (hh * nq + i) * D, D, sc);
        }
      }
    }
    if (need_dq && !(do_prefix || do_seq)) {  // no keys at all: dq = 0
      for (int64_t hh = 0; hh < G; ++hh) {
        const int64_t h = hkv * G + hh;
        in_t* base = static_cast<in_t*>(p.dq.data) + b * p.dq.s[0] + h * p.dq.s[1];
        fill(w.row, D, acc_t(0));
        for (int64_t i = 0; i < p.N; ++i) store_row<in_t, acc_t>(base + i * p.dq.s[2], p.dq.s[3], w.row, D, acc_t(1));
      }
    }
    if (need_dk) flush_grad(p.dk, b, hkv, D, dK, w.dKw);
    if (need_dv) flush_grad(p.dv, b, hkv, Dv, dV, w.dVw);
  }

  void backward(int64_t slot_begin, int64_t slot_end) const {
    const int64_t n_tasks = p.n_chunks * p.Hkv;
    if (n_tasks == 0) return;
    const int64_t RD = round_up16(R_max * D), RDv = round_up16(R_max * Dv), RK = round_up16(R_max * BK),
                  KD = round_up16(BK * D), KDv = round_up16(BK * Dv), Rr = round_up16(R_max),
                  Dr = round_up16(std::max(D, Dv));
    const int64_t dcap_n = cap2 > acc_t(0) ? RK : 0;
    const int64_t dk_n = p.dk.data != nullptr ? round_up16(p.M * D) : 0;
    const int64_t dv_n = p.dv.data != nullptr ? round_up16(p.M * Dv) : 0;
    const int64_t dpk_n = p.dpk.data != nullptr ? round_up16(p.P * D) : 0;
    const int64_t dpv_n = p.dpv.data != nullptr ? round_up16(p.P * Dv) : 0;
    Scratch<acc_t> buf(2 * RD + RDv + 2 * RK + dcap_n + 2 * Rr + KD + KDv + Dr + dk_n + dv_n + dpk_n + dpv_n);
    Scratch<int32_t> hidden(BK);
    BwdWs w;
    w.Qs = buf.ptr;
    w.dO = w.Qs + RD;
    w.dQ = w.dO + RDv;
    w.S = w.dQ + RD;
    w.dP = w.S + RK;
    w.dcap = w.dP + RK;
    w.delta = w.dcap + dcap_n;
    w.lse2 = w.delta + Rr;
    w.Kb = w.lse2 + Rr;
    w.Vb = w.Kb + KD;
    w.row = w.Vb + KDv;
    w.dKw = w.row + Dr;
    w.dVw = w.dKw + dk_n;
    w.dPKw = w.dVw + dv_n;
    w.dPVw = w.dPKw + dpk_n;
    w.hidden = hidden.ptr;
    for (int64_t slot = slot_begin; slot < slot_end; ++slot)
      for (int64_t t = slot; t < n_tasks; t += p.num_slots) backward_chunk(w, t / p.Hkv, t % p.Hkv);
  }

  // ------------------------------------------------------------------ prefix reduction
  void reduce_prefix(const void* part_v, MutRef dst, int64_t width, int64_t pair_begin,
                     int64_t pair_end) const {
    const acc_t* part = static_cast<const acc_t*>(part_v);
    const int64_t PD = p.P * width;
    Scratch<acc_t> acc(PD);
    for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
      const int64_t t = pair / p.Hkv, hkv = pair % p.Hkv;
      const int64_t c0 = p.prefix_chunks[t], c1 = p.prefix_chunks[t + 1];
      if (c1 - c0 == 1) continue;  // written by its chunk's task
      fill(acc.ptr, PD, acc_t(0));
      for (int64_t c = c0; c < c1; ++c) {  // ascending chunks: a fixed order
        const acc_t* src = part + (p.chunk_part[c] * p.Hkv + hkv) * PD;
        for (int64_t e = 0; e < PD; ++e) acc.ptr[e] += src[e];
      }
      store_prefix(dst, t, hkv, width, acc.ptr);
    }
  }
};

template <typename F>
void dispatch(const Params& p, F&& f) {
  switch (p.dtype) {
    case DType::kFloat32: f(Attention<float, float>(p)); break;
    case DType::kFloat64: f(Attention<double, double>(p)); break;
    case DType::kBFloat16: f(Attention<bf16_t, float>(p)); break;
    case DType::kFloat16: f(Attention<f16_t, float>(p)); break;
  }
}

}  // namespace

void forward_slots(const Params& p, int64_t slot_begin, int64_t slot_end) {
  dispatch(p, [&](const auto& a) { a.forward(slot_begin, slot_end); });
}

void cascade_prefix_slots(const Params& p, int64_t slot_begin, int64_t slot_end) {
  dispatch(p, [&](const auto& a) { a.cascade_prefix(slot_begin, slot_end); });
}

void backward_slots(const Params& p, int64_t slot_begin, int64_t slot_end) {
  dispatch(p, [&](const auto& a) { a.backward(slot_begin, slot_end); });
}

void reduce_prefix(const Params& p, const void* part, MutRef dst, int64_t width, int64_t pair_begin,
                   int64_t pair_end) {
  dispatch(p, [&](const auto& a) { a.reduce_prefix(part, dst, width, pair_begin, pair_end); });
}

}  // namespace PK_ISA
}  // namespace prefix_kernels_cpu
