// bias_act on CPU: y = act(x + bias), one fp32 evaluation per element, rows in parallel, the
// activation a template parameter (csrc/activation.h). Exact GELU is compute-bound (erf per
// element); gelu_tanh and relu are memory-bound.
#include <cmath>

#include "../contracts.h"
#include "../ops.h"
#include "vec.h"

namespace bert_fast {

namespace {

template <bf_act_t A>
inline Vec activate(const Vec& h) {
  if constexpr (A == BF_ACT_GELU) {
    // exact GELU, 0.5 x (1 + erf(x / sqrt 2)), as ATen's vectorized GELU kernel computes it
    return Vec(0.5f) * h * (Vec(1.f) + (h * Vec(static_cast<float>(M_SQRT1_2))).erf());
  } else if constexpr (A == BF_ACT_GELU_TANH) {
    // 0.5 x (1 + tanh(u)) = x * sigmoid(2u) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3):
    // the same function with one exp and one division instead of a tanh (cheaper; exp is Sleef's
    // 1-ulp one, and exp overflowing to inf for very negative x gives x / inf = -0, the limit).
    const Vec neg_two_beta(static_cast<float>(-2.0 * M_SQRT2 * M_2_SQRTPI * 0.5));  // -2 sqrt(2 / pi)
    const Vec kappa(0.044715f);
    const Vec e = (neg_two_beta * at::vec::fmadd(kappa * h * h, h, h)).exp();
    return h / (Vec(1.f) + e);
  } else {
    return at::vec::clamp_min(h, Vec(0.f));
  }
}

template <typename T, bf_act_t A>
void bias_act_rows(const T* x, int64_t ldx, const float* bias, T* y, int64_t M, int64_t I) {
  at::parallel_for(0, M, row_grain(I), [&](int64_t r0, int64_t r1) {
    FlushDenormalsGuard ftz;
    for (int64_t r = r0; r < r1; ++r) {
      if (bias) {
        map_row(x + r * ldx, y + r * I, I, [&](int64_t j, const Vec& h) {
          return activate<A>(h + load_f(bias + j, std::min(kVec, I - j)));
        });
      } else {
        map_row(x + r * ldx, y + r * I, I, [&](int64_t, const Vec& h) { return activate<A>(h); });
      }
    }
  });
}

}  // namespace

at::Tensor bias_act_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view activation) {
  constexpr const char* op = "bias_act";
  const bf_act_t act = check_bias_act(x, bias, activation);
  const int64_t I = x.size(-1);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return y;
  const at::Tensor x2 = x.reshape({-1, I});
  const at::Tensor b = bias ? param_f32(*bias) : at::Tensor();
  const int64_t M = x2.size(0);
  BF_DISPATCH_FLOAT_TYPES(x.scalar_type(), op, [&] {
    const scalar_t* xp = x2.const_data_ptr<scalar_t>();
    const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    switch (act) {
      case BF_ACT_GELU:
        bias_act_rows<scalar_t, BF_ACT_GELU>(xp, x2.stride(0), bp, yp, M, I);
        break;
      case BF_ACT_GELU_TANH:
        bias_act_rows<scalar_t, BF_ACT_GELU_TANH>(xp, x2.stride(0), bp, yp, M, I);
        break;
      case BF_ACT_RELU:
        bias_act_rows<scalar_t, BF_ACT_RELU>(xp, x2.stride(0), bp, yp, M, I);
        break;
    }
  });
  return y;
}

}  // namespace bert_fast
