// varlen_attention backward on CPU: one task per (sequence, head), each a handful of GEMMs on the
// sequence's slices through ATen (at::mm, i.e. the BLAS PyTorch links), tasks in parallel.
//
// The forward saves only its inputs, so each task recomputes the probabilities. For one sequence
// of L tokens and one head (Q, K, V, dO: L x d slices of the packed (N, heads, d) tensors, read in
// place through their strides):
//   P  = softmax(scale Q K^T)           (L x L, fp32, the row max subtracted)
//   dV = P^T dO
//   dP = dO V^T
//   dS = P * (dP - rowsum(dP * P))      (rowsum(dP * P) = rowsum(dO * O): O is never formed)
//   dQ = scale dS K,  dK = scale dS^T Q
// With dropout on the probabilities (Z: the forward's multipliers, 0 or 1 / (1 - p), regenerated
// from the seed, csrc/cpu/dropout.h): O = (P * Z) V, so dV = (P * Z)^T dO, dP = (dO V^T) * Z, and
// dS = P * (dP - D) with D = rowsum(dP * P) = rowsum(dO * O) as before.
// Five GEMMs of 2 L^2 d FLOPs each (10 L^2 d per task; the forward has 4 L^2 d). Bytes: read Q, K,
// V, dO once, write dQ, dK, dV once (7 N d per head); the L x L score tiles live per task.
//
// Numerics: every product and the softmax in fp32; 16-bit inputs are converted to fp32 per task
// (4 L d values) and the three gradients rounded once to the input dtype. Rows are never empty (a
// sequence of length L >= 1 has L keys), so no NaN can arise; a sequence of length 0 is skipped.
//
// Scheduling: task costs (L^2) differ when lengths vary; tasks are dealt to threads up front,
// longest first to the least-loaded thread (as the forward does), and at::parallel_for runs over
// thread ids. The ATen calls inside a task run single-threaded (at::parallel_for's region). Each
// task writes its own disjoint slices of dQ, dK, dV: the result does not depend on the number of
// threads.
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "../contracts.h"
#include "../ops.h"
#include "dropout.h"

namespace bert_fast {

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cpu(const at::Tensor& grad, const at::Tensor& q,
                                                                        const at::Tensor& k, const at::Tensor& v,
                                                                        const at::Tensor& cu_seqlens,
                                                                        int64_t max_seqlen, double scale,
                                                                        double dropout_p, int64_t seed) {
  check_varlen_attention_bwd(grad, q, k, v, cu_seqlens, scale);
  check_dropout_p("varlen_attention_bwd", dropout_p);
  const Dropout drop(dropout_p, seed);
  const int64_t N = q.size(0), heads = q.size(1), d = q.size(2);
  const at::Tensor cu_t = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* cu = cu_t.const_data_ptr<int64_t>();
  const int64_t B = cu_t.numel() - 1;
  check_cu_seqlens_values(cu, B, N, max_seqlen);
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty({N, heads, d}, opts), dk = at::empty({N, heads, d}, opts);
  at::Tensor dv = at::empty({N, heads, d}, opts);
  if (N * heads * d == 0) return {dq, dk, dv};
  // tasks (sequence, head) of non-empty sequences, dealt longest first to the least-loaded thread
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (sequence, head)
  for (int64_t b = 0; b < B; ++b) {
    if (cu[b + 1] > cu[b]) {
      for (int64_t h = 0; h < heads; ++h) tasks.emplace_back(b, h);
    }
  }
  auto cost = [&](const std::pair<int64_t, int64_t>& t) {
    const int64_t L = cu[t.first + 1] - cu[t.first];
    return L * L;
  };
  std::stable_sort(tasks.begin(), tasks.end(), [&](const auto& a, const auto& b) { return cost(a) > cost(b); });
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks.size()));
  std::vector<std::vector<std::pair<int64_t, int64_t>>> per_thread(nthreads);
  std::vector<int64_t> load(nthreads, 0);
  for (const auto& t : tasks) {
    const int64_t i = std::min_element(load.begin(), load.end()) - load.begin();
    per_thread[i].push_back(t);
    load[i] += cost(t);
  }
  const bool f32 = q.scalar_type() == at::kFloat;
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    // Grad mode is thread-local and worker threads start with it on: without this guard the ATen calls
    // below, on views of inputs that require grad, would record autograd nodes whose reference cycles
    // (through the in-place updates) keep q, k and v alive after backward — a leak of the whole
    // graph per training step.
    const at::NoGradGuard no_grad;
    for (int64_t t = t0; t < t1; ++t) {
      for (const auto& [b, h] : per_thread[t]) {
        const int64_t s = cu[b], L = cu[b + 1] - cu[b];
        // (L, d) views of this sequence and head; 16-bit ones converted to fp32
        auto slice = [&](const at::Tensor& x) {
          const at::Tensor view = x.narrow(0, s, L).select(1, h);
          return f32 ? view : view.to(at::kFloat);
        };
        const at::Tensor Q = slice(q), Kt = slice(k), V = slice(v), dO = slice(grad);
        const at::Tensor P = at::softmax(at::mm(Q, Kt.t()).mul_(fscale), 1);  // fp32, max-subtracted
        at::Tensor dP = at::mm(dO, V.t());
        if (drop.active) {
          at::Tensor Z = at::empty({L, L}, P.options());
          float* zp = Z.data_ptr<float>();
          const uint64_t stream = static_cast<uint64_t>(b * heads + h);
          for (int64_t i = 0; i < L; ++i) dropout_multipliers(drop, stream, static_cast<uint64_t>(i * L), L, zp + i * L);
          dP.mul_(Z);
          dv.narrow(0, s, L).select(1, h).copy_(at::mm(P.mul(Z).t(), dO));
        } else {
          dv.narrow(0, s, L).select(1, h).copy_(at::mm(P.t(), dO));
        }
        const at::Tensor D = dP.mul(P).sum(1, /*keepdim=*/true);
        const at::Tensor dS = dP.sub_(D).mul_(P);  // P (dP - D), in dP's storage
        dq.narrow(0, s, L).select(1, h).copy_(at::mm(dS, Kt).mul_(fscale));
        dk.narrow(0, s, L).select(1, h).copy_(at::mm(dS.t(), Q).mul_(fscale));
      }
    }
  });
  return {dq, dk, dv};
}

}  // namespace bert_fast
