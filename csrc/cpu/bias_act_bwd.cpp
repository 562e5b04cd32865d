// bias_act backward on CPU: dx = grad * act'(x + bias) and dbias = sum over rows of dx. One pass
// over the rows recomputes h = x + bias in fp32 (nothing but x is saved by the forward), writes dx
// and accumulates dbias per block of rows into an fp32 partial row; the partial rows are then
// summed (a column reduction). Blocks depend only on the number of rows, so the result does not
// depend on the thread count. Reads grad and x once, writes dx once: memory-bound except exact GELU.
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <cmath>

#include "../contracts.h"
#include "../ops.h"
#include "vec.h"

namespace bert_fast {

namespace {

constexpr int64_t kBlockRows = 32;

template <bf_act_t A>
inline Vec activation_grad(const Vec& h) {
  if constexpr (A == BF_ACT_GELU) {
    // d/dh [h Phi(h)] = Phi(h) + h phi(h), Phi(h) = 0.5 (1 + erf(h / sqrt 2)), phi = exp(-h^2/2) / sqrt(2 pi)
    const Vec cdf = Vec(0.5f) * (Vec(1.f) + (h * Vec(static_cast<float>(M_SQRT1_2))).erf());
    const Vec pdf = (Vec(-0.5f) * h * h).exp() * Vec(static_cast<float>(0.5 * M_2_SQRTPI * M_SQRT1_2));
    return at::vec::fmadd(h, pdf, cdf);
  } else if constexpr (A == BF_ACT_GELU_TANH) {
    // y = 0.5 h (1 + t), t = tanh(u), u = b (h + k h^3):
    // dy/dh = 0.5 (1 + t) + 0.5 h (1 - t^2) b (1 + 3 k h^2)   (PyTorch's tanh-GELU backward formula)
    const Vec beta(static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5));
    const Vec kappa(0.044715f);
    const Vec h2 = h * h;
    const Vec t = (beta * at::vec::fmadd(kappa * h2, h, h)).tanh();
    const Vec left = Vec(0.5f) * (Vec(1.f) + t);
    const Vec right = Vec(0.5f) * h * (Vec(1.f) - t * t) * beta * at::vec::fmadd(Vec(3.f) * kappa, h2, Vec(1.f));
    return left + right;
  } else {
    // relu: 1 where h > 0, else 0 (as torch's threshold_backward: 0 at h == 0)
    return Vec::blendv(Vec(0.f), Vec(1.f), h > Vec(0.f));
  }
}

template <typename T, bf_act_t A>
void bias_act_bwd_rows(const T* g, int64_t ldg, const T* x, int64_t ldx, const float* bias, T* dx, float* partial,
                       int64_t M, int64_t I) {
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    FlushDenormalsGuard ftz;
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* acc = partial ? partial + blk * I : nullptr;
      for (int64_t r = blk * kBlockRows; r < std::min(M, (blk + 1) * kBlockRows); ++r) {
        for (int64_t j = 0; j < I; j += kVec) {
          const int64_t n = std::min(kVec, I - j);
          Vec h = load_f(x + r * ldx + j, n);
          if (bias) h = h + load_f(bias + j, n);
          const Vec d = load_f(g + r * ldg + j, n) * activation_grad<A>(h);
          store_f(dx + r * I + j, d, n);
          if (acc) {
            // accumulate the value stored in dx (rounded to T) so dbias is the sum of dx
            const Vec dr = load_f(dx + r * I + j, n);
            store_f(acc + j, load_f(acc + j, n) + dr, n);
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bias_act_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                    const std::optional<at::Tensor>& bias,
                                                    c10::string_view activation) {
  constexpr const char* op = "bias_act_bwd";
  const bf_act_t act = check_bias_act_bwd(grad, x, bias, activation);
  const int64_t I = x.size(-1);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t M = I ? x.numel() / I : 0;
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows;
  at::Tensor partial = bias ? at::zeros({std::max<int64_t>(blocks, 1), I}, x.options().dtype(at::kFloat))
                            : at::Tensor();
  if (x.numel() == 0) return {dx, bias ? partial.sum(0) : at::empty({0}, x.options().dtype(at::kFloat))};
  const at::Tensor x2 = x.reshape({-1, I});
  const at::Tensor g2 = grad.reshape({-1, I});
  const at::Tensor b = bias ? param_f32(*bias) : at::Tensor();
  BF_DISPATCH_FLOAT_TYPES(x.scalar_type(), op, [&] {
    const scalar_t* gp = g2.const_data_ptr<scalar_t>();
    const scalar_t* xp = x2.const_data_ptr<scalar_t>();
    const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
    scalar_t* dp = dx.data_ptr<scalar_t>();
    float* pp = partial.defined() ? partial.data_ptr<float>() : nullptr;
    switch (act) {
      case BF_ACT_GELU:
        bias_act_bwd_rows<scalar_t, BF_ACT_GELU>(gp, g2.stride(0), xp, x2.stride(0), bp, dp, pp, M, I);
        break;
      case BF_ACT_GELU_TANH:
        bias_act_bwd_rows<scalar_t, BF_ACT_GELU_TANH>(gp, g2.stride(0), xp, x2.stride(0), bp, dp, pp, M, I);
        break;
      case BF_ACT_RELU:
        bias_act_bwd_rows<scalar_t, BF_ACT_RELU>(gp, g2.stride(0), xp, x2.stride(0), bp, dp, pp, M, I);
        break;
    }
  });
  return {dx, bias ? partial.sum(0) : at::empty({0}, x.options().dtype(at::kFloat))};
}

}  // namespace bert_fast
