// bias_residual_layer_norm on CPU: y = LayerNorm(x (+ linear_bias) (+ residual)) * weight + bias,
// one pass over each row (csrc/cpu/layer_norm_row.h), rows in parallel. Memory-bound: reads x and
// the residual once, writes y once. bias_residual_layer_norm_dropout applies HF's dropout to
// x + linear_bias before the residual add, its mask generated per row from the seed
// (csrc/cpu/dropout.h; stream 0, index row * H + column) and never stored.
#include <vector>

#include "../contracts.h"
#include "../ops.h"
#include "dropout.h"
#include "layer_norm_row.h"

namespace bert_fast {

namespace {

// The arguments were validated by the caller (check_bias_residual_layer_norm, which gave H).
at::Tensor bias_residual_layer_norm_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                         double eps, const std::optional<at::Tensor>& linear_bias,
                                         const std::optional<at::Tensor>& residual, const Dropout& drop, int64_t H) {
  constexpr const char* op = "bias_residual_layer_norm";
  const at::Tensor w = param_f32(weight), b = param_f32(bias);
  const at::Tensor lb = linear_bias ? param_f32(*linear_bias) : at::Tensor();
  const at::Tensor x2 = x.reshape({-1, H});  // a view when the leading dims collapse, else a copy
  const at::Tensor r2 = residual ? residual->reshape({-1, H}) : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t M = x2.size(0);
  if (M == 0) return y;
  const float feps = static_cast<float>(eps);
  BF_DISPATCH_FLOAT_TYPES(x.scalar_type(), op, [&] {
    const scalar_t* xp = x2.const_data_ptr<scalar_t>();
    const scalar_t* rp = r2.defined() ? r2.const_data_ptr<scalar_t>() : nullptr;
    const int64_t ldx = x2.stride(0), ldr = r2.defined() ? r2.stride(0) : 0;
    const float* lbp = lb.defined() ? lb.const_data_ptr<float>() : nullptr;
    const float* wp = w.const_data_ptr<float>();
    const float* bp = b.const_data_ptr<float>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, M, row_grain(H), [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(H), mult(drop.active ? H : 0);
      for (int64_t r = r0; r < r1; ++r) {
        if (drop.active) dropout_multipliers(drop, 0, static_cast<uint64_t>(r * H), H, mult.data());
        ln_row<scalar_t>(xp + r * ldx, lbp, rp ? rp + r * ldr : nullptr, nullptr, wp, bp, feps, yp + r * H, H,
                         buf.data(), drop.active ? mult.data() : nullptr);
      }
    });
  });
  return y;
}

}  // namespace

at::Tensor bias_residual_layer_norm_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                        double eps, const std::optional<at::Tensor>& linear_bias,
                                        const std::optional<at::Tensor>& residual) {
  const int64_t H = check_bias_residual_layer_norm(x, weight, bias, linear_bias, residual);
  return bias_residual_layer_norm_impl(x, weight, bias, eps, linear_bias, residual, Dropout(), H);
}

at::Tensor bias_residual_layer_norm_dropout_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                                double eps, const std::optional<at::Tensor>& linear_bias,
                                                const std::optional<at::Tensor>& residual, double dropout_p,
                                                int64_t seed) {
  const int64_t H = check_bias_residual_layer_norm(x, weight, bias, linear_bias, residual);
  check_dropout_p("bias_residual_layer_norm_dropout", dropout_p);
  return bias_residual_layer_norm_impl(x, weight, bias, eps, linear_bias, residual, Dropout(dropout_p, seed), H);
}

}  // namespace bert_fast
