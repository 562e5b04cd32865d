// linear(x, weight, bias?) on CPU: y = x W^T (+ bias), the GEMM itself left to ATen (oneDNN / MKL).
//
// Why an op for a GEMM: on CPUs with AMX, oneDNN's own 2-thread split of a bf16/fp16 GEMM of
// BERT's shapes (hundreds of packed tokens x 768..3072) is uneven: measured at 524 tokens it ran
// some shapes at ~600 GFLOP/s and others (N = 2304, 3072) at ~330 GFLOP/s, i.e. on one core.
// Splitting the *rows* of x evenly across ATen's threads and running one single-threaded GEMM per
// thread (nested parallelism is off inside at::parallel_for) gave 1.21x per encoder layer at 524
// tokens and 1.45x at 1024 (benchmarks/NOTES.md). fp32 (MKL) already scales across threads, and
// small batches (< kMinRowsPerThread rows per thread) lose to the split, so those take at::linear.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>

#include "../contracts.h"
#include "../ops.h"

namespace bert_fast {

namespace {
constexpr int64_t kMinRowsPerThread = 128;
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear(x, weight, bias);
  const bool half = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  const int64_t rows = x.numel() / std::max<int64_t>(1, x.size(-1));
  const int64_t threads = at::get_num_threads();
  if (!half || threads < 2 || rows < threads * kMinRowsPerThread || at::in_parallel_region()) {
    return at::linear(x, weight, bias);
  }
  const at::Tensor x2 = x.reshape({rows, x.size(-1)});
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = weight.size(0);
  at::Tensor y = at::empty({rows, weight.size(0)}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor wt = weight.t();
  const int64_t chunk = (rows + threads - 1) / threads;
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, threads, 1, [&](int64_t c0, int64_t c1) {
    // Worker threads do not inherit the caller's inference mode; without it, writing into an
    // inference tensor's rows would be refused.
    c10::InferenceMode guard(inference);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * chunk, r1 = std::min(rows, r0 + chunk);
      if (r0 >= r1) continue;
      at::Tensor out = y.narrow(0, r0, r1 - r0);
      if (bias) {
        out.copy_(bias->unsqueeze(0).expand({r1 - r0, weight.size(0)}));
        out.addmm_(x2.narrow(0, r0, r1 - r0), wt);
      } else {
        at::mm_out(out, x2.narrow(0, r0, r1 - r0), wt);
      }
    }
  });
  return y.view(out_shape);
}

}  // namespace bert_fast
