// sgemm_pack(weight) / sgemm_packed_linear(x, packed, n, k, bias?): y = x W^T (+ bias) in fp32 on a
// weight packed once, for small batches (the 1..256 rows of batch-1 inference), with AVX2 + FMA
// chosen at run time.
//
// Why: at a few rows a GEMM is a pass over the weight (N x K floats) with M FMAs per weight element;
// oneDNN's and MKL's small-M paths reach 55-70% of this core's fp32 peak on BERT's shapes, ONNX
// Runtime's MLAS ~85% (benchmarks/NOTES.md, "Small-M SGEMM with packed weights (AVX2)"). This is the
// BLIS / MLAS scheme, nothing more:
//
// * Packing: W (N x K, any strides) -> ceil(N / 16) panels of 16 columns, each K x 16 with the 16
//   values of one k contiguous (one 64-byte line per k), the last panel zero-padded. Done once per
//   weight (the caller caches it): 4 * ceil(N / 16) * 16 * K bytes.
// * Micro-kernel 6 x 16: 12 ymm accumulators, per k two loads of the panel and 6 broadcasts of x, 12
//   FMAs. M tails run the same code with fewer rows (templated; the rows are spread evenly over the
//   blocks), N tails compute the zero-padded columns and store with a mask; the bias is added at the
//   store.
// * No K blocking for the caches: one panel (K x 16 floats, 48 KB at K = 768, 192 KB at 3072) stays in
//   L2 while every 6-row block of x passes over it, and at small M all of x (192 KB at 16 x 3072) stays
//   in L2 while every panel passes. Measured (1 thread, BERT-base shapes, interleaved): K blocks of
//   256 / 384 / 512 outermost (x block in L1) were 2-10% slower than none at M = 16..256. The sum is
//   blocked (kSumBlock, below) for accuracy, within one row block and panel.
// * Threads: the panels are split over at::parallel_for (one contiguous range per thread; no nesting).
//
// Numerics: fp32 FMAs, each output a sequential sum over k in blocks of 768 (the blocks' sums added in
// order), bias added last; the result differs from oneDNN / MKL only by the order of the additions. FLOPs 2 M N K; bytes moved at
// small M are the packed weight's (4 N K) plus x and y.
// Limits: fp32 only, CPU only, x of shape (..., k) (a 2-D x with unit column stride is read in place,
// anything else is made contiguous first). Without AVX2 + FMA (or off x86-64 / GCC-compatible
// compilers) sgemm_available() is false and sgemm_packed_linear raises; callers keep their old path.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "../ops.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define BERT_FAST_SGEMM_X86 1
#include <immintrin.h>
#endif

namespace bert_fast {

namespace {

constexpr int64_t kNR = 16;   // panel width: two ymm registers
constexpr int64_t kMR = 6;    // rows per micro-kernel call: 12 accumulators + 2 panel + 1 broadcast register
// The panel is prefetched this many k rows (64-byte lines) ahead. Measured 1 thread, M = 16, BERT-base
// shapes, interleaved: 0 -> 29-31 GFLOP/s, 16 -> 30-32, 64 -> 32.6-32.8 (machine shared, +-1).
constexpr int64_t kPrefetch = 64;
// Each output is summed in K blocks of kSumBlock products, each block from zero, then added to the
// previous blocks' sum in y: the rounding error grows with kSumBlock + K / kSumBlock instead of K.
// Measured against an fp64 reference (x ~ N(0, 1), W ~ 0.05 N(0, 1), 64 rows), max abs error at
// K = 3072: one chain 2.9e-5, blocks of 768 8.9e-6, 512 6.2e-6 (oneDNN 1.0e-5, F.linear 3.9e-6); at
// K = 768 8.3e-6 (oneDNN the same). Cost of blocks of 768, interleaved: none measurable at M = 1..256.
constexpr int64_t kSumBlock = 768;

int64_t panels_of(int64_t n) { return (n + kNR - 1) / kNR; }

#ifdef BERT_FAST_SGEMM_X86
#define BERT_FAST_AVX2 __attribute__((target("avx2,fma")))

// Lanes [0, nvalid) of a 16-wide row as two 8-lane masks (nvalid in 1..16).
alignas(64) constexpr int32_t kMaskSrc[32] = {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                              0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0};

// c[0:MR, 0:16] = (accumulate ? c : 0) + a[0:MR, 0:K] * b[0:K, 0:16] (+ bias[0:16]), b one panel block
// (row stride 16), the product summed from zero. Columns >= nvalid are neither read nor written (masks).
template <int MR>
BERT_FAST_AVX2 void micro_kernel(int64_t K, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                                 int64_t nvalid, const float* bias, bool accumulate) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  const float* ar[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) ar[i] = a + i * lda;
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    // The panel streams from memory on its first pass: ask for it kPrefetch lines ahead (past the end
    // of the panel that is the next panel; a prefetch never faults).
    _mm_prefetch(reinterpret_cast<const char*>(b + (k + kPrefetch) * kNR), _MM_HINT_T0);
    const __m256 b0 = _mm256_loadu_ps(b + k * kNR);
    const __m256 b1 = _mm256_loadu_ps(b + k * kNR + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(ar[i] + k);
      c0[i] = _mm256_fmadd_ps(ai, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(ai, b1, c1[i]);
    }
  }
  if (nvalid == kNR) {
    const __m256 bias0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    const __m256 bias1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      __m256 y0 = c0[i], y1 = c1[i];
      if (accumulate) {
        y0 = _mm256_add_ps(_mm256_loadu_ps(c + i * ldc), y0);
        y1 = _mm256_add_ps(_mm256_loadu_ps(c + i * ldc + 8), y1);
      }
      _mm256_storeu_ps(c + i * ldc, _mm256_add_ps(y0, bias0));
      _mm256_storeu_ps(c + i * ldc + 8, _mm256_add_ps(y1, bias1));
    }
  } else {
    const __m256i m0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskSrc + kNR - nvalid));
    const __m256i m1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskSrc + kNR - nvalid + 8));
    const __m256 bias0 = bias ? _mm256_maskload_ps(bias, m0) : _mm256_setzero_ps();
    const __m256 bias1 = bias ? _mm256_maskload_ps(bias + 8, m1) : _mm256_setzero_ps();
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      __m256 y0 = c0[i], y1 = c1[i];
      if (accumulate) {
        y0 = _mm256_add_ps(_mm256_maskload_ps(c + i * ldc, m0), y0);
        y1 = _mm256_add_ps(_mm256_maskload_ps(c + i * ldc + 8, m1), y1);
      }
      _mm256_maskstore_ps(c + i * ldc, m0, _mm256_add_ps(y0, bias0));
      _mm256_maskstore_ps(c + i * ldc + 8, m1, _mm256_add_ps(y1, bias1));
    }
  }
}

// y[0:M, panels [p0, p1)] = x W^T (+ bias) for the panels [p0, p1) of the packed weight.
BERT_FAST_AVX2 void sgemm_panels(const float* x, int64_t lda, const float* packed, const float* bias, float* y,
                                 int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t p0, int64_t p1) {
  // ceil(M / 6) row blocks of as even a height as possible (16 rows: 6 + 5 + 5, not 6 + 6 + 4): a
  // block of fewer than 5 rows has fewer than the 10 independent accumulators that keep both FMA
  // pipes busy (FMA latency 4-5 cycles).
  const int64_t blocks = (M + kMR - 1) / kMR;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t nvalid = std::min(kNR, N - p * kNR);
    for (int64_t blk = 0, m = 0; blk < blocks; ++blk) {
      const int64_t left = blocks - blk;
      const int64_t mr = (M - m + left - 1) / left;
      float* c = y + m * ldy + p * kNR;
      for (int64_t k0 = 0; k0 < K; k0 += kSumBlock) {
        const int64_t kb = std::min(kSumBlock, K - k0);
        const float* a = x + m * lda + k0;
        const float* b = packed + p * K * kNR + k0 * kNR;
        const float* bp = bias != nullptr && k0 + kb == K ? bias + p * kNR : nullptr;
        const bool acc = k0 > 0;
        switch (mr) {
          case 6: micro_kernel<6>(kb, a, lda, b, c, ldy, nvalid, bp, acc); break;
          case 5: micro_kernel<5>(kb, a, lda, b, c, ldy, nvalid, bp, acc); break;
          case 4: micro_kernel<4>(kb, a, lda, b, c, ldy, nvalid, bp, acc); break;
          case 3: micro_kernel<3>(kb, a, lda, b, c, ldy, nvalid, bp, acc); break;
          case 2: micro_kernel<2>(kb, a, lda, b, c, ldy, nvalid, bp, acc); break;
          default: micro_kernel<1>(kb, a, lda, b, c, ldy, nvalid, bp, acc); break;
        }
      }
      m += mr;
    }
  }
}
#endif  // BERT_FAST_SGEMM_X86

void check_fp32_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), ", expected cpu");
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " is ", t.scalar_type(), ", expected Float (fp32)");
}

}  // namespace

bool sgemm_available_cpu() {
#ifdef BERT_FAST_SGEMM_X86
  static const bool available = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return available;
#else
  return false;
#endif
}

at::Tensor sgemm_pack_cpu(const at::Tensor& weight) {
  constexpr const char* op = "sgemm_pack";
  check_fp32_cpu(op, "weight", weight);
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got shape ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  const at::Tensor w = weight.contiguous();
  at::Tensor packed = at::empty({panels_of(N) * kNR * K}, weight.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels_of(N), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* panel = dst + p * K * kNR;
      for (int64_t j = 0; j < kNR; ++j) {
        const int64_t row = p * kNR + j;
        if (row < N) {
          const float* w_row = src + row * K;
          for (int64_t k = 0; k < K; ++k) panel[k * kNR + j] = w_row[k];
        } else {
          for (int64_t k = 0; k < K; ++k) panel[k * kNR + j] = 0.0f;  // zero padding of the last panel
        }
      }
    }
  });
  return packed;
}

at::Tensor sgemm_packed_linear_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t k,
                                   const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sgemm_packed_linear";
  TORCH_CHECK(sgemm_available_cpu(), op, ": unsupported on this CPU (needs AVX2 and FMA on x86-64)");
  check_fp32_cpu(op, "x", x);
  check_fp32_cpu(op, "packed", packed);
  TORCH_CHECK(n > 0 && k > 0, op, ": n and k must be positive, got n=", n, ", k=", k);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, op, ": x has ", x.dim() ? x.size(-1) : 0,
              " features in its last dim, the packed weight expects ", k);
  TORCH_CHECK(packed.dim() == 1 && packed.is_contiguous() && packed.numel() == panels_of(n) * kNR * k, op,
              ": packed must be a contiguous 1-D tensor of ", panels_of(n) * kNR * k,
              " floats (sgemm_pack of an (n, k) weight), got shape ", packed.sizes());
  if (bias) {
    check_fp32_cpu(op, "bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must have shape (", n, "), got ", bias->sizes());
  }
#ifdef BERT_FAST_SGEMM_X86
  // A 2-D x with unit column stride is read in place (any row stride); anything else is made
  // contiguous (one copy, no different math).
  const at::Tensor x2 = x.dim() == 2 && x.stride(1) == 1 ? x : x.reshape({-1, k}).contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor y = at::empty({M, n}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0) return y.view(out_shape);
  const float* xp = x2.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t lda = x2.stride(0);
  // At least ~64K FMAs per thread's range, so one-row calls are not spread over threads for nothing.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, M * k * kNR));
  at::parallel_for(0, panels_of(n), grain, [&](int64_t p0, int64_t p1) {
    sgemm_panels(xp, lda, wp, bp, yp, n, M, n, k, p0, p1);
  });
  return y.view(out_shape);
#else
  TORCH_CHECK(false, op, ": unsupported on this CPU (needs AVX2 and FMA on x86-64)");
#endif
}

}  // namespace bert_fast
