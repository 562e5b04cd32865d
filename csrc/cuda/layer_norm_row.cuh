// One LayerNorm row per block on CUDA, shared by bias_residual_layer_norm.cu and
// embed_layer_norm.cu: the summed row is kept in shared memory as fp32 (hidden <= kMaxHidden), the
// mean and the biased variance (mean of squared deviations, a second pass over shared memory: no
// cancellation) are block reductions in fp32, and the normalized row is written once. The mean is
// taken of the row shifted by its first element, so a constant row has exactly zero deviations (an
// unshifted fp32 sum rounds, and eps = 1e-12 makes rstd ~1e6, which would amplify that to O(0.1)).
#pragma once

#include "common.cuh"

namespace bert_fast_cuda {

constexpr int64_t kMaxHidden = 12288;  // 48 KiB of fp32 shared memory

// mean and rstd of the fp32 row in shared memory (every thread has written its part of it).
__device__ __forceinline__ void row_stats(const float* row, int64_t H, float eps, float* shared32, float& mean,
                                          float& rstd) {
  __syncthreads();  // row[0] was written by thread 0
  const float shift = row[0];
  float local = 0.f;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) local += row[j] - shift;
  mean = shift + block_sum(local, shared32) / static_cast<float>(H);  // == shift exactly for a constant row
  float sq = 0.f;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const float d = row[j] - mean;
    sq += d * d;
  }
  const float var = block_sum(sq, shared32) / static_cast<float>(H);
  rstd = rsqrtf(var + eps);  // eps exactly as given
}

inline int threads_for(int64_t H) {
  int t = 32;
  while (t < 1024 && t * 4 < H) t *= 2;  // about 4 elements per thread, 32..1024 threads
  return t;
}

// y = (row - mean) * rstd * weight + bias, one rounding to T.
template <typename T>
__device__ __forceinline__ void write_normalized(const float* row, int64_t H, float mean, float rstd,
                                                 const float* __restrict__ weight, const float* __restrict__ bias,
                                                 T* __restrict__ y) {
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) y[j] = from_f<T>((row[j] - mean) * rstd * weight[j] + bias[j]);
}

}  // namespace bert_fast_cuda

namespace bert_fast_cuda {

// Launch shape of a one-block-per-row LayerNorm: ok == false for sizes the kernels do not support.
struct RowLaunch {
  bool ok;
  dim3 grid;
  int threads;
  size_t smem;
};

inline RowLaunch row_launch(int64_t rows, int64_t hidden) {
  const bool ok = hidden > 0 && hidden <= kMaxHidden && rows >= 0 && rows <= 0x7fffffff;
  return {ok, dim3(static_cast<unsigned>(ok ? rows : 0)), threads_for(hidden),
          static_cast<size_t>(hidden) * sizeof(float)};
}

}  // namespace bert_fast_cuda
