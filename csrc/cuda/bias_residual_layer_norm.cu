// bias + residual + LayerNorm: one block per row (layer_norm_row.cuh). Reads x and the residual
// once, writes y once; parameters are fp32.
#include "kernels.cuh"
#include "layer_norm_row.cuh"

namespace bert_fast_cuda {

template <typename T>
__global__ void bias_residual_layer_norm_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ residual,
                                                int64_t ldr, const float* __restrict__ linear_bias,
                                                const float* __restrict__ weight, const float* __restrict__ bias,
                                                float eps, T* __restrict__ y, int64_t H) {
  extern __shared__ float row[];
  __shared__ float shared32[32];
  const int64_t r = blockIdx.x;
  const T* xr = x + r * ldx;
  const T* rr = residual ? residual + r * ldr : nullptr;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    float h = to_f(xr[j]);
    if (linear_bias) h += linear_bias[j];  // HF's order: (x + linear_bias) + residual
    if (rr) h += to_f(rr[j]);
    row[j] = h;
  }
  float mean, rstd;
  row_stats(row, H, eps, shared32, mean, rstd);
  write_normalized(row, H, mean, rstd, weight, bias, y + r * H);
}

template <typename T>
void launch(const RowLaunch& l, const void* x, int64_t ldx, const void* residual, int64_t ldr,
            const float* linear_bias, const float* weight, const float* bias, float eps, void* y, int64_t hidden,
            cudaStream_t s) {
  bias_residual_layer_norm_kernel<T><<<l.grid, l.threads, l.smem, s>>>(
      static_cast<const T*>(x), ldx, static_cast<const T*>(residual), ldr, linear_bias, weight, bias, eps,
      static_cast<T*>(y), hidden);
}

}  // namespace bert_fast_cuda

using namespace bert_fast_cuda;

extern "C" int bf_bias_residual_layer_norm(bf_dtype_t dtype, const void* x, int64_t ldx, const void* residual,
                                           int64_t ldr, const float* linear_bias, const float* weight,
                                           const float* bias, float eps, void* y, int64_t rows, int64_t hidden,
                                           void* stream) {
  const RowLaunch l = row_launch(rows, hidden);
  if (!l.ok) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case BF_FLOAT32:
      launch<float>(l, x, ldx, residual, ldr, linear_bias, weight, bias, eps, y, hidden, s);
      break;
    case BF_FLOAT16:
      launch<__half>(l, x, ldx, residual, ldr, linear_bias, weight, bias, eps, y, hidden, s);
      break;
    case BF_BFLOAT16:
      launch<__nv_bfloat16>(l, x, ldx, residual, ldr, linear_bias, weight, bias, eps, y, hidden, s);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return launch_status();
}
