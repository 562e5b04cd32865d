// bias_residual_layer_norm backward on CPU. Forward: h = (x + linear_bias) + residual,
// y = (h - mean) * rstd * weight + bias. Given dy:
//   xhat = (h - mean) rstd, g = dy * weight,
//   dh = rstd (g - mean(g) - xhat mean(g xhat))            (per row; = dx = dresidual)
//   dweight = sum_rows dy xhat, dbias = sum_rows dy, dlinear_bias = sum_rows dh   (column reductions)
// With dropout (h = (x + linear_bias) * m + residual, m the forward's multipliers regenerated from
// the seed, csrc/cpu/dropout.h): dresidual = dh, dx = dh * m, dlinear_bias = sum_rows dh * m; without
// it dx is dh and the dresidual output is an empty placeholder.
// One pass per row recomputes h, mean and rstd from x and the residual in fp32 (the forward saves
// no statistics), writes dh once, and accumulates the three column sums per block of rows into fp32
// partial rows, summed afterwards. Blocks depend only on the number of rows (deterministic for any
// thread count). Reads dy, x, residual once; writes dh once.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <vector>

#include "../contracts.h"
#include "../ops.h"
#include "dropout.h"
#include "layer_norm_row.h"
#include "vec.h"

namespace bert_fast {

namespace {
constexpr int64_t kBlockRows = 32;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bias_residual_layer_norm_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& residual, double dropout_p,
    int64_t seed) {
  constexpr const char* op = "bias_residual_layer_norm_bwd";
  const int64_t H = check_bias_residual_layer_norm_bwd(grad, x, weight, bias, linear_bias, residual);
  check_dropout_p(op, dropout_p);
  const Dropout drop(dropout_p, seed);
  const at::Tensor w = param_f32(weight);
  const at::Tensor lb = linear_bias ? param_f32(*linear_bias) : at::Tensor();
  const at::Tensor x2 = x.reshape({-1, H});
  const at::Tensor g2 = grad.reshape({-1, H});
  const at::Tensor r2 = residual ? residual->reshape({-1, H}) : at::Tensor();
  at::Tensor dh = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dx = drop.active ? at::empty_like(dh) : at::empty({0}, x.options());
  const int64_t M = x2.size(0);
  const int64_t blocks = std::max<int64_t>((M + kBlockRows - 1) / kBlockRows, 1);
  // partial column sums per block: [dweight | dbias | dlinear_bias]
  at::Tensor partial = at::zeros({blocks, 3, H}, x.options().dtype(at::kFloat));
  if (M > 0) {
    const float feps = static_cast<float>(eps);
    BF_DISPATCH_FLOAT_TYPES(x.scalar_type(), op, [&] {
      const scalar_t* gp = g2.const_data_ptr<scalar_t>();
      const scalar_t* xp = x2.const_data_ptr<scalar_t>();
      const scalar_t* rp = r2.defined() ? r2.const_data_ptr<scalar_t>() : nullptr;
      const int64_t ldg = g2.stride(0), ldx = x2.stride(0), ldr = r2.defined() ? r2.stride(0) : 0;
      const float* lbp = lb.defined() ? lb.const_data_ptr<float>() : nullptr;
      const float* wp = w.const_data_ptr<float>();
      scalar_t* dp = dh.data_ptr<scalar_t>();
      scalar_t* dxp = drop.active ? dx.data_ptr<scalar_t>() : nullptr;
      float* pp = partial.data_ptr<float>();
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        std::vector<float> hbuf(H), gbuf(H), mult(drop.active ? H : 0);
        for (int64_t blk = b0; blk < b1; ++blk) {
          float* dw = pp + blk * 3 * H;
          float* db = dw + H;
          float* dlb = db + H;
          for (int64_t r = blk * kBlockRows; r < std::min(M, (blk + 1) * kBlockRows); ++r) {
            // pass 1: h into hbuf, dy into gbuf (fp32), sum of h
            const float* m = nullptr;
            if (drop.active) {
              dropout_multipliers(drop, 0, static_cast<uint64_t>(r * H), H, mult.data());
              m = mult.data();
            }
            Vec acc(0.f);
            for (int64_t j = 0; j < H; j += kVec) {
              const int64_t n = std::min(kVec, H - j);
              Vec h = load_f(xp + r * ldx + j, n);
              if (lbp) h = h + load_f(lbp + j, n);
              if (m) h = h * load_f(m + j, n);
              if (rp) h = h + load_f(rp + r * ldr + j, n);
              store_f(hbuf.data() + j, h, n);
              store_f(gbuf.data() + j, load_f(gp + r * ldg + j, n), n);
              acc = acc + h;
            }
            const float mean = hsum(acc) / static_cast<float>(H);
            const Vec vmean(mean);
            Vec acc2(0.f);
            for (int64_t j = 0; j < H; j += kVec) {
              const int64_t n = std::min(kVec, H - j);
              Vec d = load_f(hbuf.data() + j, n) - vmean;
              if (n < kVec) d = Vec::set(Vec(0.f), d, n);
              acc2 = at::vec::fmadd(d, d, acc2);
            }
            const float rstd = 1.f / std::sqrt(hsum(acc2) / static_cast<float>(H) + feps);
            const Vec vrstd(rstd);
            // pass 2: xhat into hbuf; means of g = dy w and of g xhat; column sums of dy xhat and dy
            Vec mg, mgx;
            ln_bwd_row_sums(
                H, [&](int64_t j, int64_t n) { return (load_f(hbuf.data() + j, n) - vmean) * vrstd; },
                [&](int64_t j, int64_t n) { return load_f(gbuf.data() + j, n); }, wp, hbuf.data(), dw, db, mg, mgx);
            // pass 3: dh = rstd (g - mean(g) - xhat mean(g xhat)); its column sum is dlinear_bias
            for (int64_t j = 0; j < H; j += kVec) {
              const int64_t n = std::min(kVec, H - j);
              const Vec xhat = load_f(hbuf.data() + j, n);
              const Vec g = load_f(gbuf.data() + j, n) * load_f(wp + j, n);
              const Vec d = vrstd * (g - mg - xhat * mgx);
              store_f(dp + r * H + j, d, n);
              if (m) {
                const Vec dm = d * load_f(m + j, n);
                store_f(dxp + r * H + j, dm, n);
                store_f(dlb + j, load_f(dlb + j, n) + dm, n);
              } else {
                store_f(dlb + j, load_f(dlb + j, n) + d, n);
              }
            }
          }
        }
      });
    });
  }
  const at::Tensor sums = partial.sum(0);  // (3, H): the column reduction over the blocks
  // separate tensors (the schema's outputs must not alias): 3 H floats copied
  if (drop.active) return {dx, sums[0].clone(), sums[1].clone(), sums[2].clone(), dh};
  return {dh, sums[0].clone(), sums[1].clone(), sums[2].clone(), dx};
}

}  // namespace bert_fast
