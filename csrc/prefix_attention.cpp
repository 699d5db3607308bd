// prefix_kernels C++ CPU op: argument checks, output allocation, BLAS selection, threading and
// the torch.library registration of
//   prefix_kernels::fwd_cpu(q, k, v, prefix_k, prefix_v, key_padding_mask?, prefix_ids?, causal, scale,
//       sliding_window?, softcap?, sinks?, options=[])
//       -> (out [B,Hq,N,Dv] in q's layout, lse [B,Hq,N] fp32 (fp64 for fp64 inputs), natural log)
//   prefix_kernels::bwd_cpu(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask?,
//       prefix_ids?, causal, scale, output_mask, sliding_window?, softcap?, sinks?, options=[])
//       -> [dq, dk, dv, dprefix_k, dprefix_v] (output_mask of 5) or [..., dsinks] (of 6: sinks given)
//       (a gradient not asked for in output_mask comes back as an empty [0] tensor)
//   prefix_kernels::cpu_build_info(options=[]) -> str
//   prefix_kernels::cpu_cascade_calls() -> int   (forwards that took the shared-prefix cascade)
// options (int[]): the op's switches (struct Options, OptionIndex), [] for the defaults. The op
// reads no environment variable: prefix_kernels/cpu.py's CPUOptions names and checks the switches,
// reads their environment variables once and passes them here.
// The kernels themselves live in kernel_impl.h (built as kernel_base.cpp and kernel_avx2.cpp).

#include <dlfcn.h>

#include <array>
#include <atomic>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include "kernel_common.h"

namespace prefix_kernels_cpu {
namespace {

using at::Tensor;

// ---------------------------------------------------------------- BLAS
using FortranSgemm = void (*)(const char*, const char*, const int*, const int*, const int*,
                              const float*, const float*, const int*, const float*, const int*,
                              const float*, float*, const int*);
using FortranDgemm = void (*)(const char*, const char*, const int*, const int*, const int*,
                              const double*, const double*, const int*, const double*, const int*,
                              const double*, double*, const int*);
using MklSetLocal = int (*)(int);  // MKL_Set_Num_Threads_Local, the C entry point

struct Blas {
  FortranSgemm sgemm = nullptr;
  FortranDgemm dgemm = nullptr;
  MklSetLocal mkl_set_num_threads_local = nullptr;
};

// torch's own MKL (LP64 interface), when libtorch_cpu exports it: tile products then skip the
// ATen dispatch (a few microseconds per call, which matters for 64 x 128 tiles). Otherwise, or
// with the option gemm=1 (aten), every tile product goes through at::cpu::addmm_out.
const Blas& blas() {
  static const Blas found = [] {
    Blas b;
    if (!at::hasMKL()) return b;
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) == 0 || info.dli_fname == nullptr)
      return b;
    void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (lib == nullptr) return b;
    auto s = reinterpret_cast<FortranSgemm>(dlsym(lib, "sgemm_"));
    auto d = reinterpret_cast<FortranDgemm>(dlsym(lib, "dgemm_"));
    if (s != nullptr && d != nullptr) {
      b.sgemm = s;
      b.dgemm = d;
      b.mkl_set_num_threads_local = reinterpret_cast<MklSetLocal>(dlsym(lib, "MKL_Set_Num_Threads_Local"));
    }
    return b;
  }();
  return found;
}

// Row-major C = alpha op(A) op(B) + beta C as the column-major C^T = op(B)^T op(A)^T.
template <typename T, typename Fn>
void blas_gemm(Fn fn, bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char op_b = tb ? 'T' : 'N', op_a = ta ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), LDB = int(ldb), LDA = int(lda), LDC = int(ldc);
  fn(&op_b, &op_a, &M, &N, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
}

template <typename T>
void aten_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    Tensor t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, opts);
    return trans ? t.t() : t;
  };
  Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::cpu::addmm_out(C, C, view(a, m, k, lda, ta), view(b, k, n, ldb, tb), beta, alpha);
}

void sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  blas_gemm<float>(blas().sgemm, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void dgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
           int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  blas_gemm<double>(blas().dgemm, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// MKL called from a single work slot must not spread over threads: that would make results
// depend on the thread count (and oversubscribe inside at::parallel_for).
struct SingleThreadedBlas {
  int prev = 0;
  SingleThreadedBlas() {
    if (blas().mkl_set_num_threads_local) prev = blas().mkl_set_num_threads_local(1);
  }
  ~SingleThreadedBlas() {
    if (blas().mkl_set_num_threads_local) blas().mkl_set_num_threads_local(prev);
  }
};

// ---------------------------------------------------------------- ISA choice
bool cpu_has_avx2_fma() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// ---------------------------------------------------------------- options
// The op's switches, its last argument: an int[] of kNumOptions values in OptionIndex order
// (cpu.py's CPUOptions.op_arg writes it), or [] for the defaults. One argument, not one per
// switch: every argument costs each call a conversion on its way through the dispatcher.
enum OptionIndex : int64_t {
  kOptIsa,            // 0: AVX2+FMA+F16C kernels where the CPU has them, 1: the portable kernels (tests)
  kOptGemm,           // 0: torch's own MKL where libtorch exports it, 1: ATen (at::cpu::addmm_out)
  kOptCascade,        // shared-prefix cascade: -1 the cost model, 0 never, 1 whenever P > 0
  kOptBlockRows,      // stacked query rows per task (0: 128)
  kOptBlockK,         // keys per tile (0: 128, or 512 for few-row decode tiles)
  kOptCascadeRows,    // stacked query rows per cascade task (0: kCascadeRows)
  kOptCascadeBlockK,  // prefix keys per cascade tile (0: kCascadeBlockK)
  kNumOptions,
};

struct Options {
  bool base_isa = false;
  bool aten_gemm = false;
  std::optional<bool> cascade;  // nullopt: the cost model
  int64_t block_rows = 0, block_k = 0, cascade_rows = 0, cascade_block_k = 0;  // 0: the default
};

Options make_options(at::IntArrayRef v) {
  Options o;
  if (v.empty()) return o;
  TORCH_CHECK(int64_t(v.size()) == kNumOptions, "prefix_kernels cpu: options must hold ", int64_t(kNumOptions),
              " ints (isa, gemm, cascade, block_rows, block_k, cascade_rows, cascade_block_k) or none, got ",
              v.size());
  const std::pair<const char*, bool> checks[] = {
      {"isa (0 or 1)", v[kOptIsa] == 0 || v[kOptIsa] == 1},
      {"gemm (0 or 1)", v[kOptGemm] == 0 || v[kOptGemm] == 1},
      {"cascade (-1, 0 or 1)", v[kOptCascade] >= -1 && v[kOptCascade] <= 1},
      {"block_rows (>= 0)", v[kOptBlockRows] >= 0},
      {"block_k (>= 0)", v[kOptBlockK] >= 0},
      {"cascade_rows (>= 0)", v[kOptCascadeRows] >= 0},
      {"cascade_block_k (>= 0)", v[kOptCascadeBlockK] >= 0}};
  for (int64_t i = 0; i < kNumOptions; ++i)
    TORCH_CHECK(checks[i].second, "prefix_kernels cpu: options[", i, "] is ", checks[i].first, ", got ", v[i]);
  o.base_isa = v[kOptIsa] == 1;
  o.aten_gemm = v[kOptGemm] == 1;
  if (v[kOptCascade] >= 0) o.cascade = v[kOptCascade] == 1;
  o.block_rows = v[kOptBlockRows];
  o.block_k = v[kOptBlockK];
  o.cascade_rows = v[kOptCascadeRows];
  o.cascade_block_k = v[kOptCascadeBlockK];
  return o;
}

int64_t or_default(int64_t value, int64_t fallback) { return value > 0 ? value : fallback; }

bool use_avx2(const Options& opt) {
  static const bool has = cpu_has_avx2_fma();
  return has && !opt.base_isa;
}

bool use_mkl(const Options& opt) { return blas().sgemm != nullptr && !opt.aten_gemm; }

std::string build_info(at::IntArrayRef options) {
  const Options opt = make_options(options);
  return std::string("isa=") + (use_avx2(opt) ? "avx2" : "base") +
         " gemm=" + (use_mkl(opt) ? "mkl" : "aten") +
         " threads=" + std::to_string(at::get_num_threads());
}

// ---------------------------------------------------------------- checks and params
std::string shape_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, "prefix_kernels cpu: q must be float32, float64, bfloat16 or float16, got ",
                  t.scalar_type());
  }
}

TensorRef ref(const Tensor& t) {
  TensorRef r;
  r.data = t.data_ptr();
  const int64_t pad = 4 - t.dim();
  for (int64_t i = 0; i < t.dim(); ++i) r.s[pad + i] = t.stride(i);
  return r;
}

MutRef mut(const Tensor& t) {
  MutRef r;
  r.data = t.data_ptr();
  const int64_t pad = 4 - t.dim();
  for (int64_t i = 0; i < t.dim(); ++i) r.s[pad + i] = t.stride(i);
  return r;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Keeps alive the converted helper tensors the Params point into.
struct Prepared {
  Params p;
  Tensor ids;    // int64 contiguous
  Tensor kpm;    // bool
  Tensor sinks;  // [Hq] accumulation dtype, contiguous
};

// The optional features (see Params): sliding_window, softcap, sinks.
struct Features {
  std::optional<int64_t> sliding_window;
  std::optional<double> softcap;
  std::optional<Tensor> sinks;
};

Prepared prepare(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk,
                 const Tensor& pv, const std::optional<Tensor>& key_padding_mask,
                 const std::optional<Tensor>& prefix_ids, bool causal, double scale,
                 const Features& features, const Options& opt) {
  TORCH_CHECK(q.dim() == 4, "prefix_kernels cpu: q must be [B, Hq, N, D], got ", shape_str(q));
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(3) == D,
              "prefix_kernels cpu: k must be [B=", B, ", Hkv, M, D=", D, "], got ", shape_str(k));
  const int64_t Hkv = k.size(1), M = k.size(2);
  TORCH_CHECK(v.dim() == 4 && v.size(0) == B && v.size(1) == Hkv && v.size(2) == M && v.size(3) >= 1,
              "prefix_kernels cpu: v must be [B=", B, ", Hkv=", Hkv, ", M=", M,
              ", Dv] with Dv >= 1 (k's shape but its own head dim), got ", shape_str(v));
  const int64_t Dv = v.size(3);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "prefix_kernels cpu: q's head count Hq=", Hq,
              " must be a multiple of k's head count Hkv=", Hkv);
  TORCH_CHECK(D >= 1, "prefix_kernels cpu: head dim D must be >= 1, got q ", shape_str(q));
  TORCH_CHECK(!causal || M >= N, "prefix_kernels cpu: causal attention needs k's M=", M,
              " >= q's N=", N, " (queries are the last N of M positions)");
  TORCH_CHECK(pk.dim() == 3 || pk.dim() == 4, "prefix_kernels cpu: prefix_k must be [Hkv=", Hkv,
              ", P, D=", D, "] or [T, Hkv=", Hkv, ", P, D=", D, "], got ", shape_str(pk));
  TORCH_CHECK(pk.size(-3) == Hkv && pk.size(-1) == D, "prefix_kernels cpu: prefix_k must be [Hkv=",
              Hkv, ", P, D=", D, "] or [T, Hkv=", Hkv, ", P, D=", D, "], got ", shape_str(pk));
  TORCH_CHECK(pv.dim() == pk.dim() && pv.sizes().slice(0, pk.dim() - 1) == pk.sizes().slice(0, pk.dim() - 1) &&
                  pv.size(-1) == Dv,
              "prefix_kernels cpu: prefix_v must have prefix_k's shape ", shape_str(pk),
              " with v's head dim Dv=", Dv, " last, got ", shape_str(pv));
  const int64_t T = pk.dim() == 4 ? pk.size(0) : 1, P = pk.size(-2);
  // A bank of no prefixes is fine for an empty batch only (nothing to compute, empty grads).
  TORCH_CHECK(T >= 1 || B == 0, "prefix_kernels cpu: prefix_k holds no prefix (T=0): ", shape_str(pk));
  const std::pair<const char*, const Tensor*> all[] = {
      {"q", &q}, {"k", &k}, {"v", &v}, {"prefix_k", &pk}, {"prefix_v", &pv}};
  for (const auto& [name, t] : all) {
    TORCH_CHECK(t->device().is_cpu(), "prefix_kernels cpu: ", name, " must be a CPU tensor, got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "prefix_kernels cpu: ", name,
                " must have q's dtype ", q.scalar_type(), ", got ", t->scalar_type());
  }
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "prefix_kernels cpu: scale must be a positive finite float, got ", scale);
  if (features.sliding_window.has_value())
    TORCH_CHECK(*features.sliding_window >= 1, "prefix_kernels cpu: sliding_window must be an int >= 1 (or None), got ",
                *features.sliding_window);
  if (features.softcap.has_value())
    TORCH_CHECK(std::isfinite(*features.softcap) && *features.softcap > 0,
                "prefix_kernels cpu: softcap must be a positive finite float (or None), got ", *features.softcap);

  Prepared out;
  Params& p = out.p;
  p.dtype = dtype_of(q);
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.G = Hq / Hkv; p.N = N; p.M = M; p.P = P; p.D = D; p.Dv = Dv; p.T = T;
  p.causal = causal;
  p.scale = scale;
  p.window = features.sliding_window.value_or(0);
  p.softcap = features.softcap.value_or(0.0);
  if (features.sinks.has_value()) {
    const Tensor& s = *features.sinks;
    TORCH_CHECK(s.dim() == 1 && s.size(0) == Hq, "prefix_kernels cpu: sinks must be [Hq=", Hq,
                "] (one logit per query head), got ", shape_str(s));
    TORCH_CHECK(s.scalar_type() == q.scalar_type() || s.scalar_type() == at::kFloat,
                "prefix_kernels cpu: sinks must have q's dtype ", q.scalar_type(), " or float32, got ",
                s.scalar_type());
    TORCH_CHECK(s.device().is_cpu(), "prefix_kernels cpu: sinks must be a CPU tensor, got ", s.device());
    out.sinks = s.to(acc_type(q.scalar_type())).contiguous();
    p.sinks = Hq > 0 ? out.sinks.data_ptr() : nullptr;
  }
  if (B * Hq * N > 0) {  // data pointers of empty tensors are never read
    p.q = ref(q);
    p.k = ref(k);
    p.v = ref(v);
    p.pk = ref(pk);
    p.pv = ref(pv);
  }
  if (key_padding_mask.has_value()) {
    const Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B && m.size(1) == M,
                "prefix_kernels cpu: key_padding_mask must be a bool [B=", B, ", M=", M,
                "] tensor (True = attend), got ", m.scalar_type(), " ", shape_str(m));
    TORCH_CHECK(m.device().is_cpu(), "prefix_kernels cpu: key_padding_mask must be a CPU tensor");
    out.kpm = m;
    if (m.numel() > 0) {
      p.kpm = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
      p.kpm_s0 = m.stride(0);
      p.kpm_s1 = m.stride(1);
    }
  }
  if (prefix_ids.has_value()) {
    const Tensor& ids = *prefix_ids;
    TORCH_CHECK(at::isIntegralType(ids.scalar_type(), /*includeBool=*/false) && ids.dim() == 1 &&
                    ids.size(0) == B,
                "prefix_kernels cpu: prefix_ids must be an integer [B=", B, "] tensor, got ",
                ids.scalar_type(), " ", shape_str(ids));
    TORCH_CHECK(ids.device().is_cpu(), "prefix_kernels cpu: prefix_ids must be a CPU tensor");
    TORCH_CHECK(pk.dim() == 4, "prefix_kernels cpu: prefix_ids needs a bank of prefixes [T, Hkv, P, D], got prefix_k ",
                shape_str(pk));
    out.ids = ids.to(at::kLong).contiguous();
    const int64_t* d = out.ids.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(d[b] >= 0 && d[b] < T, "prefix_kernels cpu: prefix_ids must be in [0, T=", T,
                  "), got ", d[b], " at row ", b);
    p.ids = B > 0 ? d : nullptr;
  } else {
    TORCH_CHECK(T == 1 || B == 0, "prefix_kernels cpu: prefix_k holds T=", T,
                " prefixes ", shape_str(pk), ": pass prefix_ids [B] to choose one per row");
  }

  // Blocks: about 128 stacked query rows (G heads x BQ queries) per task, and enough tasks for
  // every thread; decode-like shapes (few rows) take long key tiles instead.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows = or_default(opt.block_rows, 128);
  // (G = 0 when Hq = 0: nothing is computed then, but no division by zero either)
  int64_t bq = std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(N, 1), rows / std::max<int64_t>(p.G, 1)));
  while (bq > 16 && B * Hkv * ((N + bq - 1) / bq) < 2 * threads) bq = (bq + 1) / 2;
  p.block_q = bq;
  p.block_k = or_default(opt.block_k, p.G * bq <= 16 ? 512 : 128);
  p.sgemm = use_mkl(opt) ? &sgemm : &aten_gemm<float>;
  p.dgemm = use_mkl(opt) ? &dgemm : &aten_gemm<double>;
  return out;
}

template <typename F>
void run_slots(Params& p, int64_t n_tasks, F&& body) {
  if (n_tasks <= 0) return;
  p.num_slots = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tasks));
  at::parallel_for(0, p.num_slots, 1, [&](int64_t s0, int64_t s1) {
    SingleThreadedBlas single;
    body(s0, s1);
  });
}

// Backward chunks (see Params::chunk_*): rows ordered by prefix id, then row; each prefix's rows
// cut into ceil(rows / per_chunk) balanced chunks of consecutive rows, per_chunk = ceil(B / target)
// with target = clamp(ceil(64 / Hkv), 8, B) chunks (about 64 (chunk, kv head) tasks, for
// parallelism, whatever B), fewer if their partials would pass kPartialBytes. Only a prefix with
// several chunks needs partials (at most 2 * target chunks in all), so they take
// O(target * Hkv * P * D), not O(B * Hkv * P * D), and the cut depends on the shape and
// prefix_ids only (never on the thread count): results are deterministic. Without prefix
// gradients to sum every row is its own chunk.
struct Chunks {
  std::vector<int64_t> rows, off, prefix, part;
  int64_t n_parts = 0;
};

constexpr int64_t kChunkTasks = 64;  // aimed-for number of (chunk, kv head) tasks
constexpr int64_t kMinChunks = 8;
constexpr int64_t kPartialBytes = int64_t(64) << 20;  // per prefix gradient, for target chunks

Chunks make_chunks(const Params& p, bool prefix_grads, int64_t acc_bytes) {
  Chunks c;
  const int64_t B = p.B, T = p.T;
  auto id = [&](int64_t b) { return p.ids != nullptr ? p.ids[b] : int64_t(0); };
  c.rows.resize(B);
  c.prefix.assign(T + 1, 0);
  if (!prefix_grads) {
    c.off.resize(B + 1);
    for (int64_t b = 0; b <= B; ++b) c.off[b] = b;
    for (int64_t b = 0; b < B; ++b) c.rows[b] = b;
    c.part.assign(B, -1);
    return c;
  }
  // counting sort of the rows by prefix id (stable: ascending rows within a prefix)
  std::vector<int64_t> count(T + 1, 0);
  for (int64_t b = 0; b < B; ++b) ++count[id(b) + 1];
  for (int64_t t = 0; t < T; ++t) count[t + 1] += count[t];
  std::vector<int64_t> first(count.begin(), count.end() - 1);
  for (int64_t b = 0; b < B; ++b) c.rows[first[id(b)]++] = b;
  const int64_t chunk_bytes = std::max<int64_t>(1, p.Hkv * p.P * std::max(p.D, p.Dv) * acc_bytes);
  const int64_t target = std::max<int64_t>(1, std::min({B, std::max(kMinChunks, (kChunkTasks + p.Hkv - 1) / p.Hkv),
                                                        kPartialBytes / chunk_bytes}));
  const int64_t per_chunk = (B + target - 1) / target;
  c.off.push_back(0);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t r0 = count[t], n = count[t + 1] - r0;
    const int64_t k = (n + per_chunk - 1) / per_chunk;  // chunks of prefix t
    for (int64_t i = 0; i < k; ++i) {
      c.off.push_back(r0 + (i + 1) * n / k);
      c.part.push_back(k > 1 ? c.n_parts++ : -1);
    }
    c.prefix[t + 1] = c.prefix[t] + k;
  }
  return c;
}

// ---------------------------------------------------------------- cascade dispatch
// Shared-prefix decode (Hydragen; FlashInfer's cascade), see Params::cascade. The per-row forward
// reads a row's prefix once per (row, kv head) -- B * Hkv * P * (D + Dv) elements -- through
// products of only G * N stacked query rows: memory bound, so sharing one prefix buys nothing. The
// cascade reads it once per (chunk of rows sharing the prefix, kv head) and does the same FLOPs as
// GEMMs of up to kCascadeRows stacked query rows (compute bound), then the per-row forward goes on
// from the prefix's softmax state with each row's own keys. Its price: the state (B * Hq * N *
// (Dv + 2) values) written and read back, and a second parallel region.
// Cost model (the option cascade=-1), with r = B / (the number of distinct
// prefixes the rows use) the rows sharing a prefix and M_seen the sequence keys one query sees
// (M, or about the window when that is shorter):
//   - N <= kCascadeMaxN: decode-like. With more queries per row the per-row path already stacks
//     G * N rows per prefix tile and is no longer memory bound on the prefix.
//   - r >= 2: the cascade reads the prefix r times less (a bank with one row per prefix gains
//     nothing).
//   - P * (1 - 1/r) >= M_seen / kCascadeMinGain: the prefix reads saved are a fair share of what a
//     row reads anyway, else the gain does not pay for the extra pass.
// cascade=1 takes the cascade whenever P > 0 (any N; for tests), 0 never. The options
// cascade_rows / cascade_block_k tune the chunks and tiles (default kCascadeRows, kCascadeBlockK).
// Measured on the 2-core dev box (benchmarks/bench_cpu.py --preset shared-prefix-cpu, fp32, 2
// threads; B=64, Hq=32, Hkv=8, N=1, M=64, D=128, one prefix for all rows): P=4096 ~25 ms against
// ~60 ms with the prefix copied into every row's cache (~0.42; the per-row path on the shared
// prefix ~55 ms), P=1024 ~9 against ~18 ms (~0.5), when the box is quiet. The cascade is then
// compute bound (its GEMMs at ~85% of what MKL reaches on 2 cores), the copy memory bound.
constexpr int64_t kCascadeMaxN = 4;
constexpr int64_t kCascadeMinGain = 8;
constexpr int64_t kCascadeBlockK = 256;  // prefix keys per cascade tile (option cascade_block_k)
constexpr int64_t kCascadeRows = 256;  // stacked query rows per cascade task (option cascade_rows)

std::atomic<int64_t> cascade_calls{0};  // forwards that took the cascade (cpu_cascade_calls, tests)

struct Cascade {
  std::vector<int64_t> rows, off;
  int64_t max_rows = 0;
};

bool use_cascade(const Params& p, const Options& opt, const std::vector<int64_t>& count) {
  if (p.P == 0 || p.B == 0) return false;
  if (opt.cascade.has_value()) return *opt.cascade;
  int64_t used = 0;
  for (int64_t t = 0; t < p.T; ++t) used += count[t + 1] > 0;
  const double r = double(p.B) / double(used);
  const int64_t span = p.causal ? p.window : 2 * p.window;
  const int64_t m_seen = p.window > 0 ? std::min(p.M, span + p.N) : p.M;
  return p.N <= kCascadeMaxN && r >= 2 && double(p.P) * (1 - 1 / r) * kCascadeMinGain >= double(m_seen);
}

// The rows ordered by prefix id, then row (a counting sort), and each prefix's rows cut into
// balanced chunks of consecutive rows of at most kCascadeRows stacked query rows (at least one
// row): from the shape and prefix_ids only. Empty when the cascade is not taken.
Cascade plan_cascade(const Params& p, const Options& opt) {
  Cascade c;
  std::vector<int64_t> count(p.T + 1, 0);
  auto id = [&](int64_t b) { return p.ids != nullptr ? p.ids[b] : int64_t(0); };
  for (int64_t b = 0; b < p.B; ++b) ++count[id(b) + 1];
  if (!use_cascade(p, opt, count)) return c;
  for (int64_t t = 0; t < p.T; ++t) count[t + 1] += count[t];
  c.rows.resize(p.B);
  std::vector<int64_t> first(count.begin(), count.end() - 1);
  for (int64_t b = 0; b < p.B; ++b) c.rows[first[id(b)]++] = b;
  const int64_t per_row = std::max<int64_t>(1, p.G * p.N);
  const int64_t chunk = std::max<int64_t>(1, or_default(opt.cascade_rows, kCascadeRows) / per_row);
  c.off.push_back(0);
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t r0 = count[t], n = count[t + 1] - r0, k = (n + chunk - 1) / chunk;
    for (int64_t i = 0; i < k; ++i) {
      c.off.push_back(r0 + (i + 1) * n / k);
      c.max_rows = std::max(c.max_rows, c.off.back() - c.off[c.off.size() - 2]);
    }
  }
  return c;
}

// out [B, Hq, N, Dv] with q's dimension order in memory (HF's [B, N, H, D] storage stays free to
// reshape): empty_like(q) when Dv = D, else dims ordered by q's strides, largest first (ties
// keep the dims' order). prefix_kernels/layout.py's new_out states the same rule for the fake
// impls (tests/test_cpu_layout.py checks that the two agree).
Tensor empty_out(const Tensor& q, int64_t Dv) {
  if (Dv == q.size(3)) return at::empty_like(q);
  std::array<int64_t, 4> order = {0, 1, 2, 3};
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return q.stride(a) > q.stride(b); });
  std::vector<int64_t> sizes(4), inverse(4);
  for (int64_t i = 0; i < 4; ++i) {
    sizes[i] = order[i] == 3 ? Dv : q.size(order[i]);
    inverse[order[i]] = i;
  }
  return at::empty(sizes, q.options()).permute(inverse);
}

std::tuple<Tensor, Tensor> fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const Tensor& prefix_k, const Tensor& prefix_v,
                                   const std::optional<Tensor>& key_padding_mask,
                                   const std::optional<Tensor>& prefix_ids, bool causal,
                                   double scale, std::optional<int64_t> sliding_window,
                                   std::optional<double> softcap, const std::optional<Tensor>& sinks,
                                   at::IntArrayRef options) {
  const Options opt = make_options(options);
  Prepared prep = prepare(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale,
                          {sliding_window, softcap, sinks}, opt);
  Params& p = prep.p;
  Tensor out = empty_out(q, p.Dv);
  Tensor lse = at::empty({p.B, p.Hq, p.N}, q.options().dtype(acc_type(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  p.out = mut(out);
  p.lse = lse.data_ptr();
  const int64_t n_tasks = p.B * p.Hkv * ((p.N + p.block_q - 1) / p.block_q);
  const bool avx2 = use_avx2(opt);
  const Cascade plan = plan_cascade(p, opt);
  Tensor state;  // the cascade's softmax state after the prefix: m, l [B, Hq, N], o [B, Hq, N, Dv]
  if (!plan.rows.empty()) {
    const int64_t n = p.B * p.Hq * p.N;
    state = at::empty({n * (p.Dv + 2)}, q.options().dtype(acc_type(q.scalar_type())));
    const int64_t elt = int64_t(state.element_size());
    p.cascade = true;
    p.casc_block_k = or_default(opt.cascade_block_k, kCascadeBlockK);
    p.casc_n = int64_t(plan.off.size()) - 1;
    p.casc_max_rows = plan.max_rows;
    p.casc_rows = plan.rows.data();
    p.casc_off = plan.off.data();
    p.casc_m = state.data_ptr();
    p.casc_l = static_cast<char*>(state.data_ptr()) + n * elt;
    p.casc_o = static_cast<char*>(state.data_ptr()) + 2 * n * elt;
    cascade_calls.fetch_add(1, std::memory_order_relaxed);
    run_slots(p, p.casc_n * p.Hkv, [&](int64_t s0, int64_t s1) {
      if (avx2) avx2::cascade_prefix_slots(p, s0, s1);
      else base::cascade_prefix_slots(p, s0, s1);
    });
  }
  run_slots(p, n_tasks, [&](int64_t s0, int64_t s1) {
    if (avx2) avx2::forward_slots(p, s0, s1);
    else base::forward_slots(p, s0, s1);
  });
  return {out, lse};
}

std::vector<Tensor> bwd_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& prefix_k, const Tensor& prefix_v, const Tensor& out, const Tensor& lse,
    const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& prefix_ids,
    bool causal, double scale, c10::List<bool> output_mask, std::optional<int64_t> sliding_window,
    std::optional<double> softcap, const std::optional<Tensor>& sinks, at::IntArrayRef options) {
  const Options opt = make_options(options);
  Prepared prep = prepare(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale,
                          {sliding_window, softcap, sinks}, opt);
  Params& p = prep.p;
  TORCH_CHECK(output_mask.size() == 5 || (output_mask.size() == 6 && sinks.has_value()),
              "prefix_kernels cpu: output_mask must hold 5 flags (dq, dk, dv, dprefix_k, dprefix_v), "
              "or 6 (and dsinks) when sinks are given, got ", output_mask.size(),
              sinks.has_value() ? "" : " without sinks");
  const std::vector<int64_t> out_shape = {p.B, p.Hq, p.N, p.Dv};
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"grad_out", &grad_out}, {"out", &out}}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef(out_shape), "prefix_kernels cpu: ", name,
                " must be [B=", p.B, ", Hq=", p.Hq, ", N=", p.N, ", Dv=", p.Dv, "] (fwd_cpu's out), got ",
                shape_str(*t));
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device().is_cpu(), "prefix_kernels cpu: ",
                name, " must be a CPU tensor of q's dtype ", q.scalar_type(), ", got ", t->scalar_type(),
                " on ", t->device());
  }
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.Hq && lse.size(2) == p.N &&
                  lse.scalar_type() == acc_type(q.scalar_type()) && lse.device().is_cpu(),
              "prefix_kernels cpu: lse must be a ", acc_type(q.scalar_type()), " CPU tensor [B=", p.B,
              ", Hq=", p.Hq, ", N=", p.N, "] (fwd_cpu's second output), got ", lse.scalar_type(), " ",
              shape_str(lse));
  auto none = [&] { return at::empty({0}, q.options()); };
  const bool need_dsinks = output_mask.size() == 6 && output_mask[5];
  Tensor dq = output_mask[0] ? at::empty_like(q) : none();
  Tensor dk = output_mask[1] ? at::empty_like(k) : none();
  Tensor dv = output_mask[2] ? at::empty_like(v) : none();
  Tensor dpk = output_mask[3] ? at::empty_like(prefix_k) : none();
  Tensor dpv = output_mask[4] ? at::empty_like(prefix_v) : none();
  // B = 0, Hq = 0 (no query heads) or N = 0 (no queries): nothing attends, every gradient asked
  // for is all zeros (or empty).
  const bool work = p.B * p.Hkv > 0 && p.Hq > 0 && p.N > 0 && p.D > 0;
  if (work) {
    Tensor lse_c = lse.contiguous();
    p.dout = ref(grad_out);
    p.o = ref(out);
    p.lse_in = lse_c.data_ptr();
    if (dq.numel() > 0) p.dq = mut(dq);
    if (dk.numel() > 0) p.dk = mut(dk);
    if (dv.numel() > 0) p.dv = mut(dv);
    if (output_mask[3] && dpk.numel() > 0) p.dpk = mut(dpk);
    if (output_mask[4] && dpv.numel() > 0) p.dpv = mut(dpv);
    const bool prefix_grads = p.dpk.data != nullptr || p.dpv.data != nullptr;
    const int64_t acc_bytes = q.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
    const Chunks chunks = make_chunks(p, prefix_grads, acc_bytes);
    p.n_chunks = int64_t(chunks.off.size()) - 1;
    p.chunk_rows = chunks.rows.data();
    p.chunk_off = chunks.off.data();
    p.prefix_chunks = chunks.prefix.data();
    p.chunk_part = chunks.part.data();
    // torch's allocator (64-byte aligned, and seen by the profiler's memory accounting)
    auto partials = [&](bool needed, int64_t width) {
      return at::empty({needed ? chunks.n_parts * p.Hkv * p.P * width * acc_bytes : 0},
                       q.options().dtype(at::kByte));
    };
    Tensor dpk_part = partials(p.dpk.data != nullptr, p.D);
    Tensor dpv_part = partials(p.dpv.data != nullptr, p.Dv);
    p.dpk_part = dpk_part.numel() > 0 ? dpk_part.data_ptr() : nullptr;
    p.dpv_part = dpv_part.numel() > 0 ? dpv_part.data_ptr() : nullptr;
    const bool avx2 = use_avx2(opt);
    if (p.dq.data || p.dk.data || p.dv.data || prefix_grads) {
      run_slots(p, p.n_chunks * p.Hkv, [&](int64_t s0, int64_t s1) {
        if (avx2) avx2::backward_slots(p, s0, s1);
        else base::backward_slots(p, s0, s1);
      });
    }
    // Prefixes split over several chunks: sum their partials in chunk order (and zeros for the
    // prefixes no row uses); single-chunk prefixes were written by their task.
    const std::tuple<const void*, MutRef, int64_t> prefix_out[] = {{p.dpk_part, p.dpk, p.D},
                                                                   {p.dpv_part, p.dpv, p.Dv}};
    for (const auto& [src, d, width] : prefix_out) {
      if (d.data == nullptr) continue;
      at::parallel_for(0, p.T * p.Hkv, 1, [&](int64_t i0, int64_t i1) {
        if (avx2) avx2::reduce_prefix(p, src, d, width, i0, i1);
        else base::reduce_prefix(p, src, d, width, i0, i1);
      });
    }
  } else {
    for (Tensor* t : {&dq, &dk, &dv, &dpk, &dpv}) t->zero_();
  }
  std::vector<Tensor> grads = {dq, dk, dv, dpk, dpv};
  if (output_mask.size() == 6) {
    // d lse / d sink_h = p_sink = exp(sink_h - lse), and d lse / d out-side terms give
    // dsinks[h] = -sum over rows b and queries i of p_sink(b, h, i) * (do . out)(b, h, i).
    Tensor dsinks = none();
    if (need_dsinks) {
      const at::ScalarType acc = acc_type(q.scalar_type());
      const Tensor delta = grad_out.to(acc).mul(out.to(acc)).sum(-1);
      const Tensor lse_acc = lse.to(acc);
      // lse = -inf: the row saw no key and its sink is -inf, so p_sink = 0 (not exp(-inf + inf) = NaN).
      const Tensor p_sink = prep.sinks.view({1, p.Hq, 1}).sub(lse_acc).exp().masked_fill(lse_acc.isneginf(), 0);
      dsinks = p_sink.mul(delta).sum(at::IntArrayRef{0, 2}).neg().to(sinks->scalar_type());
    }
    grads.push_back(dsinks);
  }
  return grads;
}

}  // namespace
}  // namespace prefix_kernels_cpu

// Both ops end in the same options argument: the autograd formula (_autograd_common.py) hands
// the forward's extra arguments to the backward as they are (the backward ignores the cascade's).
TORCH_LIBRARY_FRAGMENT(prefix_kernels, m) {
  m.set_python_module("prefix_kernels.cpu");
  m.def(
      "fwd_cpu(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor? key_padding_mask, Tensor? prefix_ids, bool causal, float scale, "
      "int? sliding_window=None, float? softcap=None, Tensor? sinks=None, int[] options=[]) -> (Tensor, Tensor)");
  m.def(
      "bwd_cpu(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor out, Tensor lse, Tensor? key_padding_mask, Tensor? prefix_ids, bool causal, "
      "float scale, bool[] output_mask, int? sliding_window=None, float? softcap=None, "
      "Tensor? sinks=None, int[] options=[]) -> Tensor[]");
  m.def("cpu_build_info(int[] options=[]) -> str", &prefix_kernels_cpu::build_info);
  // forwards so far that took the cascade (shared-prefix decode), for tests
  m.def("cpu_cascade_calls() -> int", [] { return prefix_kernels_cpu::cascade_calls.load(); });
}

TORCH_LIBRARY_IMPL(prefix_kernels, CPU, m) {
  m.impl("fwd_cpu", &prefix_kernels_cpu::fwd_cpu);
  m.impl("bwd_cpu", &prefix_kernels_cpu::bwd_cpu);
}
