// bias + residual + LayerNorm, and embeddings + LayerNorm: one block per row. The summed row is
// kept in shared memory as fp32 (hidden <= 12288), the mean and the biased variance (mean of
// squared deviations, a second pass over shared memory: no cancellation) are block reductions in
// fp32, and the normalized row is written once.
#include "common.cuh"
#include "kernels.cuh"

namespace bert_fast_cuda {

constexpr int64_t kMaxHidden = 12288;  // 48 KiB of fp32 shared memory

__device__ __forceinline__ void normalize_row(float* row, int64_t H, const float* __restrict__ weight,
                                              const float* __restrict__ bias, float eps, float local_sum,
                                              float* shared32, float& mean, float& rstd) {
  mean = block_sum(local_sum, shared32) / static_cast<float>(H);
  float sq = 0.f;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const float d = row[j] - mean;
    sq += d * d;
  }
  const float var = block_sum(sq, shared32) / static_cast<float>(H);
  rstd = rsqrtf(var + eps);  // eps exactly as given
}

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
  float local = 0.f;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    float h = to_f(xr[j]);
    if (linear_bias) h += linear_bias[j];  // HF's order: (x + linear_bias) + residual
    if (rr) h += to_f(rr[j]);
    row[j] = h;
    local += h;
  }
  float mean, rstd;
  normalize_row(row, H, weight, bias, eps, local, shared32, mean, rstd);
  T* yr = y + r * H;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    yr[j] = from_f<T>((row[j] - mean) * rstd * weight[j] + bias[j]);
  }
}

template <typename T>
__global__ void embed_layer_norm_kernel(const int64_t* __restrict__ input_ids, const T* __restrict__ inputs_embeds,
                                        int64_t lde, const int64_t* __restrict__ position_ids,
                                        const int64_t* __restrict__ token_type_ids, const T* __restrict__ word,
                                        int64_t ldw, const T* __restrict__ pos, int64_t ldp,
                                        const T* __restrict__ type, int64_t ldt, const float* __restrict__ weight,
                                        const float* __restrict__ bias, float eps, T* __restrict__ y, int64_t H) {
  extern __shared__ float row[];
  __shared__ float shared32[32];
  const int64_t t = blockIdx.x;
  const T* a = inputs_embeds ? inputs_embeds + t * lde : word + input_ids[t] * ldw;
  const T* tr = type + (token_type_ids ? token_type_ids[t] : 0) * ldt;
  const T* pr = pos + position_ids[t] * ldp;
  float local = 0.f;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const float h = (to_f(a[j]) + to_f(tr[j])) + to_f(pr[j]);  // (word + type) + position
    row[j] = h;
    local += h;
  }
  float mean, rstd;
  normalize_row(row, H, weight, bias, eps, local, shared32, mean, rstd);
  T* yr = y + t * H;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    yr[j] = from_f<T>((row[j] - mean) * rstd * weight[j] + bias[j]);
  }
}

inline int threads_for(int64_t H) {
  int t = 32;
  while (t < 1024 && t * 4 < H) t *= 2;  // about 4 elements per thread, 32..1024 threads
  return t;
}

}  // namespace bert_fast_cuda

using namespace bert_fast_cuda;

extern "C" int bf_bias_residual_layer_norm(bf_dtype_t dtype, const void* x, int64_t ldx, const void* residual,
                                           int64_t ldr, const float* linear_bias, const float* weight,
                                           const float* bias, float eps, void* y, int64_t rows, int64_t hidden,
                                           void* stream) {
  if (hidden <= 0 || hidden > kMaxHidden || rows < 0 || rows > 0x7fffffff) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const int threads = threads_for(hidden);
  const size_t smem = static_cast<size_t>(hidden) * sizeof(float);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(rows));
  switch (dtype) {
    case BF_FLOAT32:
      bias_residual_layer_norm_kernel<float><<<grid, threads, smem, s>>>(
          static_cast<const float*>(x), ldx, static_cast<const float*>(residual), ldr, linear_bias, weight, bias, eps,
          static_cast<float*>(y), hidden);
      break;
    case BF_FLOAT16:
      bias_residual_layer_norm_kernel<__half><<<grid, threads, smem, s>>>(
          static_cast<const __half*>(x), ldx, static_cast<const __half*>(residual), ldr, linear_bias, weight, bias,
          eps, static_cast<__half*>(y), hidden);
      break;
    case BF_BFLOAT16:
      bias_residual_layer_norm_kernel<__nv_bfloat16><<<grid, threads, smem, s>>>(
          static_cast<const __nv_bfloat16*>(x), ldx, static_cast<const __nv_bfloat16*>(residual), ldr, linear_bias,
          weight, bias, eps, static_cast<__nv_bfloat16*>(y), hidden);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return launch_status();
}

extern "C" int bf_embed_layer_norm(bf_dtype_t dtype, const int64_t* input_ids, const void* inputs_embeds,
                                   int64_t lde, const int64_t* position_ids, const int64_t* token_type_ids,
                                   const void* word_emb, int64_t ldw, const void* pos_emb, int64_t ldp,
                                   const void* type_emb, int64_t ldt, const float* weight, const float* bias,
                                   float eps, void* y, int64_t tokens, int64_t hidden, void* stream) {
  if (hidden <= 0 || hidden > kMaxHidden || tokens < 0 || tokens > 0x7fffffff) return cudaErrorInvalidValue;
  if ((input_ids == nullptr) == (inputs_embeds == nullptr)) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  const int threads = threads_for(hidden);
  const size_t smem = static_cast<size_t>(hidden) * sizeof(float);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(tokens));
#define BF_EMBED_LAUNCH(T)                                                                                       \
  embed_layer_norm_kernel<T><<<grid, threads, smem, s>>>(                                                         \
      input_ids, static_cast<const T*>(inputs_embeds), lde, position_ids, token_type_ids,                       \
      static_cast<const T*>(word_emb), ldw, static_cast<const T*>(pos_emb), ldp, static_cast<const T*>(type_emb), \
      ldt, weight, bias, eps, static_cast<T*>(y), hidden)
  switch (dtype) {
    case BF_FLOAT32:
      BF_EMBED_LAUNCH(float);
      break;
    case BF_FLOAT16:
      BF_EMBED_LAUNCH(__half);
      break;
    case BF_BFLOAT16:
      BF_EMBED_LAUNCH(__nv_bfloat16);
      break;
    default:
      return cudaErrorInvalidValue;
  }
#undef BF_EMBED_LAUNCH
  return launch_status();
}
