// bias + activation: one fp32 evaluation per element, grid-stride loop over rows x cols.
// Accurate erff / tanhf (no fast-math): exact GELU must match PyTorch's to 1e-5 in fp32.
#include "common.cuh"
#include "kernels.cuh"

namespace bert_fast_cuda {

template <bf_act_t A>
__device__ __forceinline__ float activate(float h) {
  if (A == BF_ACT_GELU) {
    return 0.5f * h * (1.f + erff(h * 0.70710678118654752f));  // 0.5 x (1 + erf(x / sqrt 2))
  } else if (A == BF_ACT_GELU_TANH) {
    const float inner = 0.79788456080286536f * (h + 0.044715f * h * h * h);  // sqrt(2/pi) (x + 0.044715 x^3)
    return 0.5f * h * (1.f + tanhf(inner));
  } else {
    return h > 0.f ? h : (h == h ? 0.f : h);  // relu, NaN propagates as in PyTorch
  }
}

template <typename T, bf_act_t A>
__global__ void bias_act_kernel(const T* __restrict__ x, int64_t ldx, const float* __restrict__ bias,
                                T* __restrict__ y, int64_t rows, int64_t cols) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    float h = to_f(x[r * ldx + c]);
    if (bias) h += bias[c];
    y[i] = from_f<T>(activate<A>(h));
  }
}

template <typename T>
int launch_bias_act(const void* x, int64_t ldx, const float* bias, bf_act_t act, void* y, int64_t rows, int64_t cols,
                    cudaStream_t s) {
  const int threads = 256;
  const int64_t want = (rows * cols + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(want < 65535 * 8 ? want : 65535 * 8);
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
  switch (act) {
    case BF_ACT_GELU:
      bias_act_kernel<T, BF_ACT_GELU><<<blocks, threads, 0, s>>>(xp, ldx, bias, yp, rows, cols);
      break;
    case BF_ACT_GELU_TANH:
      bias_act_kernel<T, BF_ACT_GELU_TANH><<<blocks, threads, 0, s>>>(xp, ldx, bias, yp, rows, cols);
      break;
    case BF_ACT_RELU:
      bias_act_kernel<T, BF_ACT_RELU><<<blocks, threads, 0, s>>>(xp, ldx, bias, yp, rows, cols);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return launch_status();
}

}  // namespace bert_fast_cuda

using namespace bert_fast_cuda;

extern "C" int bf_bias_act(bf_dtype_t dtype, const void* x, int64_t ldx, const float* bias, bf_act_t act, void* y,
                           int64_t rows, int64_t cols, void* stream) {
  if (rows < 0 || cols < 0) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case BF_FLOAT32:
      return launch_bias_act<float>(x, ldx, bias, act, y, rows, cols, s);
    case BF_FLOAT16:
      return launch_bias_act<__half>(x, ldx, bias, act, y, rows, cols, s);
    case BF_BFLOAT16:
      return launch_bias_act<__nv_bfloat16>(x, ldx, bias, act, y, rows, cols, s);
    default:
      return cudaErrorInvalidValue;
  }
}
