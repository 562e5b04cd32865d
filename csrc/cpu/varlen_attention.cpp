// Variable-length multi-head self-attention on CPU, over packed tokens, without padding.
//
// Work: one task per (sequence, head, query block). For a task with m query rows over a sequence
// of L tokens: S = scale * Q K^T (m x L, fp32), a numerically stable softmax per row in fp32
// (running max subtracted; every row has L >= 1 keys, so the denominator is >= 1 and nothing can
// become NaN), then O = P V written straight into the (N, heads, d) output. Q, K and V are read in
// place from their strided views (typically into the fused (N, 3 * hidden) QKV projection): the
// GEMMs take the token stride as their leading dimension, so nothing is copied or transposed.
//
// GEMMs: the BLAS that PyTorch itself links (MKL on x86-64: sgemm for fp32; for bf16/fp16 MKL's
// cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32, which use AMX/AVX512-BF16 where the CPU has
// them, chosen by MKL at run time), looked up once in the already-loaded libtorch_cpu. When a
// symbol is missing (another BLAS, or BERT_FAST_ATTN_BLAS=0 to force it) a plain at::vec kernel
// is used instead; 16-bit inputs are then converted to fp32 per task.
//
// 16-bit numerics: scores and softmax in fp32; the unnormalized probabilities exp(s - max), all in
// [0, 1], are rounded once to the input dtype for the PV GEMM (as flash-attention does), the GEMM
// accumulates in fp32, and the row is scaled by 1 / sum (fp32) before the single output rounding.
//
// Dropout (varlen_attention_dropout): each probability row is multiplied by its mask (csrc/cpu/dropout.h;
// stream sequence * heads + head, index i * L + j) before the PV product; nothing is stored.
//
// Scheduling: tasks have very different costs (m * L) when lengths vary, and at::parallel_for
// splits a range into equal contiguous chunks. So tasks are assigned to threads up front by
// longest-processing-time-first (sort by cost, give each to the least-loaded thread) and
// parallel_for runs over thread ids. Long sequences are split into query blocks so there are
// enough tasks to balance.
#include "../contracts.h"
#include "../ops.h"
#include "dropout.h"
#include "vec.h"

#include <ATen/native/CPUBlas.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <vector>

namespace bert_fast {

namespace {

// ---- BLAS lookup ----------------------------------------------------------------------------

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
// cblas_gemm_{bf16bf16f32,f16f16f32}(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
using gemm16_fn = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                           float*, int);
constexpr int kColMajor = 102, kNoTrans = 111, kTrans = 112;

struct Blas {
  sgemm_fn sgemm = nullptr;
  gemm16_fn bf16 = nullptr;
  gemm16_fn f16 = nullptr;
};

Blas load_blas() {
  Blas b;
  const char* env = std::getenv("BERT_FAST_ATTN_BLAS");
  if (env && std::string(env) == "0") return b;
  Dl_info info;
  // any function defined in libtorch_cpu tells us which file it is
  if (!dladdr(reinterpret_cast<void*>(&at::native::cpublas::could_pack), &info) || !info.dli_fname) return b;
  void* handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  if (!handle) return b;
  b.sgemm = reinterpret_cast<sgemm_fn>(dlsym(handle, "sgemm_"));
  b.bf16 = reinterpret_cast<gemm16_fn>(dlsym(handle, "cblas_gemm_bf16bf16f32"));
  b.f16 = reinterpret_cast<gemm16_fn>(dlsym(handle, "cblas_gemm_f16f16f32"));
  return b;  // the handle stays open: libtorch_cpu lives as long as the process
}

const Blas& blas() {
  static const Blas b = load_blas();
  return b;
}

template <typename T>
gemm16_fn gemm16_for() {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    return blas().bf16;
  } else if constexpr (std::is_same_v<T, at::Half>) {
    return blas().f16;
  } else {
    return nullptr;
  }
}

// Row-major fp32 fallbacks (no BLAS): C[m x n] = alpha * A[m x k] . B[n x k]^T, and
// C[m x n] = A[m x k] . B[k x n].
void gemm_nt_ref(int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      Vec acc(0.f);
      for (int64_t p = 0; p < k; p += kVec) {
        const int64_t c = std::min(kVec, k - p);
        acc = at::vec::fmadd(load_f(A + i * lda + p, c), load_f(B + j * ldb + p, c), acc);
      }
      C[i * ldc + j] = alpha * hsum(acc);
    }
  }
}
void gemm_nn_ref(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    float* c = C + i * ldc;
    for (int64_t j = 0; j < n; j += kVec) store_f(c + j, Vec(0.f), std::min(kVec, n - j));
    for (int64_t p = 0; p < k; ++p) {
      const Vec a(A[i * lda + p]);
      const float* b = B + p * ldb;
      for (int64_t j = 0; j < n; j += kVec) {
        const int64_t cnt = std::min(kVec, n - j);
        store_f(c + j, at::vec::fmadd(a, load_f(b + j, cnt), load_f(c + j, cnt)), cnt);
      }
    }
  }
}

// Row-major fp32 GEMMs through BLAS (column-major, so operands swap) or the fallback.
void sgemm_nt(int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
              float* C, int64_t ldc) {
  if (auto f = blas().sgemm) {
    // C^T (n x m) = B (n x k) . A^T: column-major op(B^T), op(A)
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const float beta = 0.f;
    f("T", "N", &M, &N, &K, &alpha, B, &la, A, &lb, &beta, C, &lc);
  } else {
    gemm_nt_ref(m, n, k, alpha, A, lda, B, ldb, C, ldc);
  }
}
void sgemm_nn(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc) {
  if (auto f = blas().sgemm) {
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const float alpha = 1.f, beta = 0.f;
    f("N", "N", &M, &N, &K, &alpha, B, &la, A, &lb, &beta, C, &lc);
  } else {
    gemm_nn_ref(m, n, k, A, lda, B, ldb, C, ldc);
  }
}

// In place: s[j] <- exp(s[j] - max(s)); returns 1 / sum. L >= 1, so sum >= 1 (the max term is 1).
inline float softmax_unnormalized(float* s, int64_t L) {
  const Vec ninf(-std::numeric_limits<float>::infinity());
  Vec vmax = ninf;
  for (int64_t j = 0; j < L; j += kVec) {
    const int64_t n = std::min(kVec, L - j);
    vmax = at::vec::maximum(vmax, n == kVec ? Vec::loadu(s + j) : Vec::set(ninf, Vec::loadu(s + j, n), n));
  }
  const Vec mx(hmax(vmax));
  Vec vsum(0.f);
  for (int64_t j = 0; j < L; j += kVec) {
    const int64_t n = std::min(kVec, L - j);
    Vec e = (Vec::loadu(s + j, n) - mx).exp_u20();
    if (n < kVec) e = Vec::set(Vec(0.f), e, n);
    vsum = vsum + e;
    store_f(s + j, e, n);
  }
  return 1.f / hsum(vsum);
}

inline void scale_row(float* s, int64_t L, float f) {
  const Vec vf(f);
  for (int64_t j = 0; j < L; j += kVec) {
    const int64_t n = std::min(kVec, L - j);
    store_f(s + j, Vec::loadu(s + j, n) * vf, n);
  }
}

// dst[j] = T(src[j] * f), full-width 16-bit stores in the main loop
template <typename T>
inline void convert_row(const float* src, T* dst, int64_t n, float f) {
  const Vec vf(f);
  int64_t j = 0;
  for (; j + 2 * kVec <= n; j += 2 * kVec) store2_f(dst + j, Vec::loadu(src + j) * vf, Vec::loadu(src + j + kVec) * vf);
  for (; j < n; j += kVec) {
    const int64_t c = std::min(kVec, n - j);
    store_f(dst + j, Vec::loadu(src + j, c) * vf, c);
  }
}

template <typename T>
inline void convert_rows(const T* src, int64_t lds, float* dst, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; j += kVec) {
      const int64_t n = std::min(kVec, cols - j);
      store_f(dst + r * cols + j, load_f(src + r * lds + j, n), n);
    }
  }
}

struct Task {
  int64_t seq, head, q0, m, cost;
};

struct Scratch {
  std::vector<float> s, o, qf, kf, vf, mult;
  std::vector<uint16_t> p16;
};

template <typename T>
struct Problem {
  const T *q, *k, *v;
  int64_t sq, sk, sv, hq, hk, hv;  // token and head strides
  T* out;
  int64_t heads, d;
  const int64_t* cu;
  float scale;
  Dropout drop;  // on the probabilities, after the softmax (inactive: p = 0)
};

// Row i of task t: s[j] *= f * (dropout multiplier of (i, j)); the multipliers need L floats of scratch.
inline void finish_row(const Dropout& drop, uint64_t stream, int64_t row, int64_t L, float* s, float f, float* mult) {
  if (!drop.active) {
    if (f != 1.f) scale_row(s, L, f);
    return;
  }
  dropout_multipliers(drop, stream, static_cast<uint64_t>(row * L), L, mult);
  const Vec vf(f);
  for (int64_t j = 0; j < L; j += kVec) {
    const int64_t n = std::min(kVec, L - j);
    store_f(s + j, Vec::loadu(s + j, n) * Vec::loadu(mult + j, n) * vf, n);
  }
}

template <typename T>
void run_task(const Problem<T>& p, const Task& t, Scratch& sc) {
  const int64_t start = p.cu[t.seq], L = p.cu[t.seq + 1] - start, m = t.m, d = p.d;
  const T* Q = p.q + (start + t.q0) * p.sq + t.head * p.hq;
  const T* K = p.k + start * p.sk + t.head * p.hk;
  const T* V = p.v + start * p.sv + t.head * p.hv;
  const int64_t ldo = p.heads * d;
  T* O = p.out + (start + t.q0) * ldo + t.head * d;
  float* S = sc.s.data();
  const uint64_t stream = static_cast<uint64_t>(t.seq * p.heads + t.head);

  const gemm16_fn g16 = gemm16_for<T>();
  if constexpr (std::is_same_v<T, float>) {
    sgemm_nt(m, L, d, p.scale, Q, p.sq, K, p.sk, S, L);
    for (int64_t i = 0; i < m; ++i) {
      float* row = S + i * L;
      finish_row(p.drop, stream, t.q0 + i, L, row, softmax_unnormalized(row, L), sc.mult.data());
    }
    sgemm_nn(m, d, L, S, L, V, p.sv, O, ldo);  // written straight into the output
  } else if (g16 != nullptr) {
    const auto* q16 = reinterpret_cast<const uint16_t*>(Q);
    const auto* k16 = reinterpret_cast<const uint16_t*>(K);
    const auto* v16 = reinterpret_cast<const uint16_t*>(V);
    // S^T (L x m, column-major) = K Q^T
    g16(kColMajor, kTrans, kNoTrans, static_cast<int>(L), static_cast<int>(m), static_cast<int>(d), p.scale, k16,
        static_cast<int>(p.sk), q16, static_cast<int>(p.sq), 0.f, S, static_cast<int>(L));
    T* P = reinterpret_cast<T*>(sc.p16.data());
    float* inv = sc.qf.data();  // m reciprocal row sums
    for (int64_t i = 0; i < m; ++i) {
      float* row = S + i * L;
      inv[i] = softmax_unnormalized(row, L);
      finish_row(p.drop, stream, t.q0 + i, L, row, 1.f, sc.mult.data());
      convert_row(row, P + i * L, L, 1.f);
    }
    float* Of = sc.o.data();  // (m x d) fp32
    g16(kColMajor, kNoTrans, kNoTrans, static_cast<int>(d), static_cast<int>(m), static_cast<int>(L), 1.f, v16,
        static_cast<int>(p.sv), reinterpret_cast<const uint16_t*>(P), static_cast<int>(L), 0.f, Of,
        static_cast<int>(d));
    for (int64_t i = 0; i < m; ++i) convert_row(Of + i * d, O + i * ldo, d, inv[i]);
  } else {
    // 16-bit without a 16-bit BLAS: convert this task's operands to fp32
    float *Qf = sc.qf.data(), *Kf = sc.kf.data(), *Vf = sc.vf.data(), *Of = sc.o.data();
    convert_rows(Q, p.sq, Qf, m, d);
    convert_rows(K, p.sk, Kf, L, d);
    convert_rows(V, p.sv, Vf, L, d);
    sgemm_nt(m, L, d, p.scale, Qf, d, Kf, d, S, L);
    std::vector<float> inv(m);
    for (int64_t i = 0; i < m; ++i) {
      float* row = S + i * L;
      inv[i] = softmax_unnormalized(row, L);
      finish_row(p.drop, stream, t.q0 + i, L, row, 1.f, sc.mult.data());
      // round the probabilities as the 16-bit BLAS path does
      for (int64_t j = 0; j < L; ++j) row[j] = static_cast<float>(static_cast<T>(row[j]));
    }
    sgemm_nn(m, d, L, S, L, Vf, d, Of, d);
    for (int64_t i = 0; i < m; ++i) convert_row(Of + i * d, O + i * ldo, d, inv[i]);
  }
}

// The BLAS calls take int leading dimensions.
void check_blas_strides(const char* name, const at::Tensor& t) {
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(t.stride(i) >= 0 && t.stride(i) < std::numeric_limits<int>::max(), "varlen_attention: ", name,
                " stride(", i, ") = ", t.stride(i), " exceeds the BLAS int range ", std::numeric_limits<int>::max());
  }
}

// BLAS needs a token stride >= head_dim; anything else (e.g. an expanded tensor) is copied once.
at::Tensor blas_compatible(const at::Tensor& t) {
  return t.stride(0) < t.size(2) ? t.contiguous() : t;
}

}  // namespace

namespace {

at::Tensor varlen_attention_impl(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                 const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale, const Dropout& drop) {
  constexpr const char* op = "varlen_attention";  // arguments validated by the caller (check_varlen_attention)
  check_blas_strides("q", q_in);
  check_blas_strides("k", k_in);
  check_blas_strides("v", v_in);
  const int64_t N = q_in.size(0), heads = q_in.size(1), d = q_in.size(2);
  const at::Tensor cu_t = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* cu = cu_t.const_data_ptr<int64_t>();
  const int64_t B = cu_t.numel() - 1;
  const int64_t lmax = check_cu_seqlens_values(cu, B, N, max_seqlen);
  at::Tensor out = at::empty({N, heads, d}, q_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0 || heads == 0 || d == 0) return out.zero_();
  const at::Tensor q = blas_compatible(q_in), k = blas_compatible(k_in), v = blas_compatible(v_in);

  // tasks: (sequence, head, query block); blocks of at most qblock rows, balanced within a sequence
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  int64_t qblock = 128;
  auto count_tasks = [&](int64_t qb) {
    int64_t n = 0;
    for (int64_t b = 0; b < B; ++b) n += (cu[b + 1] - cu[b] + qb - 1) / qb;
    return n * heads;
  };
  while (qblock > 16 && count_tasks(qblock) < 4 * nthreads) qblock /= 2;
  std::vector<Task> tasks;
  int64_t mmax = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = cu[b + 1] - cu[b];
    if (L == 0) continue;  // an empty sequence has no query rows: nothing to compute or write
    const int64_t nb = (L + qblock - 1) / qblock, per = (L + nb - 1) / nb;
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t q0 = 0; q0 < L; q0 += per) {
        const int64_t m = std::min(per, L - q0);
        mmax = std::max(mmax, m);
        // cost: the two GEMMs and the softmax scale with m * L; a constant covers per-call overhead
        tasks.push_back({b, h, q0, m, m * L * (d + 8) + 4096});
      }
    }
  }
  // longest-processing-time-first assignment to threads
  std::sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::vector<std::vector<Task>> per_thread(nthreads);
  std::vector<int64_t> load(nthreads, 0);
  for (const Task& t : tasks) {
    const int64_t i = std::min_element(load.begin(), load.end()) - load.begin();
    per_thread[i].push_back(t);
    load[i] += t.cost;
  }

  BF_DISPATCH_FLOAT_TYPES(q.scalar_type(), op, [&] {
    Problem<scalar_t> p{q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                        q.stride(0), k.stride(0), v.stride(0), q.stride(1), k.stride(1), v.stride(1),
                        out.data_ptr<scalar_t>(), heads, d, cu, static_cast<float>(scale), drop};
    at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
      Scratch sc;
      sc.s.resize(mmax * lmax);
      sc.o.resize(mmax * d);
      if (drop.active) sc.mult.resize(lmax);
      if constexpr (!std::is_same_v<scalar_t, float>) {
        sc.p16.resize(mmax * lmax);
        sc.qf.resize(std::max(mmax * d, mmax));
        if (gemm16_for<scalar_t>() == nullptr) {
          sc.kf.resize(lmax * d);
          sc.vf.resize(lmax * d);
        }
      }
      for (int64_t tid = t0; tid < t1; ++tid) {
        for (const Task& t : per_thread[tid]) run_task<scalar_t>(p, t, sc);
      }
    });
  });
  return out;
}

}  // namespace

at::Tensor varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale) {
  check_varlen_attention(q, k, v, cu_seqlens, scale);
  return varlen_attention_impl(q, k, v, cu_seqlens, max_seqlen, scale, Dropout());
}

at::Tensor varlen_attention_dropout_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale,
                                        double dropout_p, int64_t seed) {
  check_varlen_attention(q, k, v, cu_seqlens, scale);
  check_dropout_p("varlen_attention_dropout", dropout_p);
  return varlen_attention_impl(q, k, v, cu_seqlens, max_seqlen, scale, Dropout(dropout_p, seed));
}

}  // namespace bert_fast
