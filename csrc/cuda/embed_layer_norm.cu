// embeddings + LayerNorm: one block per token (layer_norm_row.cuh). Reads one row of each table
// (or of inputs_embeds) per token, writes the token's row once; parameters are fp32.
//
// Ids: the glue range-checks them on the host before the launch, except during CUDA graph capture
// (a host sync cannot be captured). So the kernel never trusts them: a token with an id outside
// its table reads nothing and gets a row of NaN.
#include <math.h>

#include "kernels.cuh"
#include "layer_norm_row.cuh"

namespace bert_fast_cuda {

template <typename T>
__global__ void embed_layer_norm_kernel(const int64_t* __restrict__ input_ids, const T* __restrict__ inputs_embeds,
                                        int64_t lde, const int64_t* __restrict__ position_ids,
                                        const int64_t* __restrict__ token_type_ids, const T* __restrict__ word,
                                        int64_t ldw, int64_t word_rows, const T* __restrict__ pos, int64_t ldp,
                                        int64_t pos_rows, const T* __restrict__ type, int64_t ldt, int64_t type_rows,
                                        const float* __restrict__ weight, const float* __restrict__ bias, float eps,
                                        T* __restrict__ y, int64_t H) {
  extern __shared__ float row[];
  __shared__ float shared32[32];
  const int64_t t = blockIdx.x;
  const int64_t wid = inputs_embeds ? 0 : input_ids[t];
  const int64_t tid = token_type_ids ? token_type_ids[t] : 0;
  const int64_t pid = position_ids[t];
  T* yr = y + t * H;
  // one branch for the whole block (the ids are per token), so no thread skips a barrier
  if ((!inputs_embeds && static_cast<uint64_t>(wid) >= static_cast<uint64_t>(word_rows)) ||
      static_cast<uint64_t>(tid) >= static_cast<uint64_t>(type_rows) ||
      static_cast<uint64_t>(pid) >= static_cast<uint64_t>(pos_rows)) {
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) yr[j] = from_f<T>(NAN);
    return;
  }
  const T* a = inputs_embeds ? inputs_embeds + t * lde : word + wid * ldw;
  const T* tr = type + tid * ldt;
  const T* pr = pos + pid * ldp;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const float h = (to_f(a[j]) + to_f(tr[j])) + to_f(pr[j]);  // (word + type) + position
    row[j] = h;
  }
  float mean, rstd;
  row_stats(row, H, eps, shared32, mean, rstd);
  write_normalized(row, H, mean, rstd, weight, bias, yr);
}

}  // namespace bert_fast_cuda

using namespace bert_fast_cuda;

extern "C" int bf_embed_layer_norm(bf_dtype_t dtype, const int64_t* input_ids, const void* inputs_embeds,
                                   int64_t lde, const int64_t* position_ids, const int64_t* token_type_ids,
                                   const void* word_emb, int64_t ldw, int64_t word_rows, const void* pos_emb,
                                   int64_t ldp, int64_t pos_rows, const void* type_emb, int64_t ldt,
                                   int64_t type_rows, const float* weight, const float* bias, float eps, void* y,
                                   int64_t tokens, int64_t hidden, void* stream) {
  const RowLaunch l = row_launch(tokens, hidden);
  if (!l.ok) return cudaErrorInvalidValue;
  if ((input_ids == nullptr) == (inputs_embeds == nullptr)) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#define BF_EMBED_LAUNCH(T)                                                                                          \
  embed_layer_norm_kernel<T><<<l.grid, l.threads, l.smem, s>>>(                                                      \
      input_ids, static_cast<const T*>(inputs_embeds), lde, position_ids, token_type_ids,                          \
      static_cast<const T*>(word_emb), ldw, word_rows, static_cast<const T*>(pos_emb), ldp, pos_rows,              \
      static_cast<const T*>(type_emb), ldt, type_rows, weight, bias, eps, static_cast<T*>(y), hidden)
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
