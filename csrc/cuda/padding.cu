// Row gather / scatter between the padded (B*L, H) and packed (N, H) layouts: one block per
// copied row, 16-byte words when the row size and the pointers allow it, bytes otherwise.
#include "common.cuh"
#include "kernels.cuh"

namespace bert_fast_cuda {

// dst[dst_rows[i] or i] = src[src_rows[i] or i]. Indices are bounds-checked here too (the glue
// checks them on the host first, except under CUDA graph capture): a source row outside
// [0, n_src) is not read and its destination row is filled with 0xff bytes; a destination row
// outside [0, n_dst) is not written.
template <typename W>
__global__ void copy_rows_kernel(const W* __restrict__ src, const int64_t* __restrict__ src_rows, int64_t n_src,
                                 W* __restrict__ dst, const int64_t* __restrict__ dst_rows, int64_t n_dst,
                                 int64_t words) {
  const int64_t i = blockIdx.x;
  const int64_t s = src_rows ? src_rows[i] : i;
  const int64_t d = dst_rows ? dst_rows[i] : i;
  if (static_cast<uint64_t>(d) >= static_cast<uint64_t>(n_dst)) return;
  W* b = dst + d * words;
  if (static_cast<uint64_t>(s) >= static_cast<uint64_t>(n_src)) {
    W poison;
    memset(&poison, 0xff, sizeof(W));
    for (int64_t j = threadIdx.x; j < words; j += blockDim.x) b[j] = poison;
    return;
  }
  const W* a = src + s * words;
  for (int64_t j = threadIdx.x; j < words; j += blockDim.x) b[j] = a[j];
}

int copy_rows(const void* src, const int64_t* src_rows, int64_t n_src, void* dst, const int64_t* dst_rows,
              int64_t n_dst, int64_t n, int64_t row_bytes, cudaStream_t s) {
  if (n < 0 || row_bytes < 0 || n > 0x7fffffff) return cudaErrorInvalidValue;
  if (n == 0 || row_bytes == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(n));
  const bool aligned16 = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  const bool aligned4 = row_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 4 == 0 &&
                        reinterpret_cast<uintptr_t>(dst) % 4 == 0;
  if (aligned16) {
    const int64_t words = row_bytes / 16;
    const int threads = words >= 256 ? 256 : (words >= 64 ? 64 : 32);
    copy_rows_kernel<int4><<<grid, threads, 0, s>>>(static_cast<const int4*>(src), src_rows, n_src,
                                                    static_cast<int4*>(dst), dst_rows, n_dst, words);
  } else if (aligned4) {
    copy_rows_kernel<int32_t><<<grid, 256, 0, s>>>(static_cast<const int32_t*>(src), src_rows, n_src,
                                                   static_cast<int32_t*>(dst), dst_rows, n_dst, row_bytes / 4);
  } else {
    copy_rows_kernel<uint8_t><<<grid, 256, 0, s>>>(static_cast<const uint8_t*>(src), src_rows, n_src,
                                                   static_cast<uint8_t*>(dst), dst_rows, n_dst, row_bytes);
  }
  return launch_status();
}

}  // namespace bert_fast_cuda

extern "C" int bf_gather_rows(const void* x, int64_t x_rows, const int64_t* indices, void* out, int64_t n,
                              int64_t row_bytes, void* stream) {
  if (x_rows < 0) return cudaErrorInvalidValue;
  return bert_fast_cuda::copy_rows(x, indices, x_rows, out, nullptr, n, n, row_bytes,
                                   static_cast<cudaStream_t>(stream));
}

extern "C" int bf_scatter_rows(const void* x, const int64_t* indices, void* out, int64_t n, int64_t num_rows,
                               int64_t row_bytes, void* stream) {
  if (num_rows < 0 || row_bytes < 0) return cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (num_rows > 0 && row_bytes > 0) {
    const cudaError_t err = cudaMemsetAsync(out, 0, static_cast<size_t>(num_rows) * row_bytes, s);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return bert_fast_cuda::copy_rows(x, nullptr, n, out, indices, num_rows, n, row_bytes, s);
}
