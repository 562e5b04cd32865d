// Shared helpers of the CPU kernels of bert_fast._C: fp32 <-> storage-type vector loads/stores on
// top of at::vec, reductions, the dtype dispatch. (Argument checks: csrc/contracts.h.)
//
// Vector width: at::vec picks its implementation from the CPU_CAPABILITY_* macros that setup.py
// passes (BERT_FAST_CPU_ISA: AVX-512 when the building CPU has it, else AVX2 on x86-64; the generic,
// compiler-vectorized fallback elsewhere). All arithmetic below is fp32 whatever the storage type.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

namespace bert_fast {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}
inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

// Load up to kVec elements (count n) of T as fp32 lanes; lanes past n are zero.
inline Vec load_f(const float* p, int64_t n = kVec) {
  return n == kVec ? Vec::loadu(p) : Vec::loadu(p, n);
}
template <typename T>
inline Vec load_f(const T* p, int64_t n = kVec) {
  if (n == kVec) {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
  float tmp[kVec] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
  return Vec::loadu(tmp);
}

// Store the first n (<= kVec) fp32 lanes of v as T (one rounding, round-to-nearest-even).
inline void store_f(float* p, const Vec& v, int64_t n = kVec) {
  if (n == kVec) {
    v.store(p);
  } else {
    v.store(p, n);
  }
}
template <typename T>
inline void store_f(T* p, const Vec& v, int64_t n = kVec) {
  // convert_from_float packs two fp32 vectors into one 16-bit vector of 2*kVec lanes; we pass v
  // twice and store only the first n lanes.
  at::vec::Vectorized<T> h = at::vec::convert_from_float<T>(v, v);
  h.store(p, static_cast<int>(n));
}

// Two fp32 vectors from 2 * kVec consecutive elements (one 16-bit vector for bf16/fp16), and
// back: the full-width loads/stores of the main loops (the count variants above serve the tails).
inline void load2_f(const float* p, Vec& a, Vec& b) {
  a = Vec::loadu(p);
  b = Vec::loadu(p + kVec);
}
template <typename T>
inline void load2_f(const T* p, Vec& a, Vec& b) {
  at::vec::load_to_float<T>(p, a, b);
}
inline void store2_f(float* p, const Vec& a, const Vec& b) {
  a.store(p);
  b.store(p + kVec);
}
template <typename T>
inline void store2_f(T* p, const Vec& a, const Vec& b) {
  at::vec::convert_from_float<T>(a, b).store(p);
}

// y[j] = f(j, x[j]) over a row of n elements, fp32 lanes: full 2 * kVec steps, then the tail.
template <typename T, typename F>
inline void map_row(const T* x, T* y, int64_t n, const F& f) {
  int64_t j = 0;
  for (; j + 2 * kVec <= n; j += 2 * kVec) {
    Vec a, b;
    load2_f(x + j, a, b);
    store2_f(y + j, f(j, a), f(j + kVec, b));
  }
  for (; j < n; j += kVec) {
    const int64_t c = std::min(kVec, n - j);
    store_f(y + j, f(j, load_f(x + j, c)), c);
  }
}

// Flush denormal results to zero (FTZ) and read denormal inputs as zero (DAZ) in this thread for
// the guard's scope, restoring the caller's MXCSR after. Exact GELU evaluates exp(-x^2 / 2), which
// is denormal for |x| > ~13: x86 then takes a microcode assist per lane (measured: bias_act 5x
// slower on such inputs). What gets flushed is below 1.2e-38 in magnitude, far under fp32's
// resolution of any GELU output it contributes to.
class FlushDenormalsGuard {
 public:
#if defined(__SSE2__)
  FlushDenormalsGuard() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FlushDenormalsGuard() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// Rows per parallel task so that each task touches at least ~16K elements.
inline int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_len)); }

// float32 / bfloat16 / float16 only (AT_DISPATCH_FLOATING_TYPES would also instantiate double).
#define BF_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                   \
  [&] {                                                                            \
    switch (TYPE) {                                                                \
      case at::kFloat: {                                                           \
        using scalar_t = float;                                                    \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      case at::kBFloat16: {                                                        \
        using scalar_t = at::BFloat16;                                             \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      case at::kHalf: {                                                            \
        using scalar_t = at::Half;                                                 \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      default:                                                                     \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", c10::toString(TYPE));      \
    }                                                                              \
  }()

}  // namespace bert_fast
