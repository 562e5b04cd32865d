// Memory-bound fused ops on CPU: bias + residual + LayerNorm, bias + activation, embeddings +
// LayerNorm. One pass over each row: the row is summed into an fp32 scratch row (which stays in
// L1), the statistics are computed from it in fp32 (mean, then the biased variance as the mean of
// squared deviations: two passes over the cached row, no cancellation), and the normalized row is
// written once in the output dtype. Parameters are read as fp32.
#include "common.h"
#include "ops.h"

#include <cmath>
#include <vector>

namespace bert_fast {

namespace {

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// y = LN(a (+ lb) (+ b) (+ c)) * w + bias, summed in that order (HF's order of operations).
// a, b, c: rows of T (b, c nullable); lb: fp32 (nullable); buf: H floats of scratch.
template <typename T>
inline void ln_row(const T* a, const float* lb, const T* b, const T* c, const float* w, const float* bias, float eps,
                   T* y, int64_t H, float* buf) {
  // pass 1: the summed row into buf (fp32), and its sum
  Vec acc(0.f), acc_b(0.f);
  int64_t j = 0;
  for (; j + 2 * kVec <= H; j += 2 * kVec) {
    Vec h0, h1, t0, t1;
    load2_f(a + j, h0, h1);
    if (lb) {
      h0 = h0 + Vec::loadu(lb + j);
      h1 = h1 + Vec::loadu(lb + j + kVec);
    }
    if (b) {
      load2_f(b + j, t0, t1);
      h0 = h0 + t0;
      h1 = h1 + t1;
    }
    if (c) {
      load2_f(c + j, t0, t1);
      h0 = h0 + t0;
      h1 = h1 + t1;
    }
    store2_f(buf + j, h0, h1);
    acc = acc + h0;
    acc_b = acc_b + h1;
  }
  for (; j < H; j += kVec) {
    const int64_t n = std::min(kVec, H - j);
    Vec h = load_f(a + j, n);  // lanes past n are zero, so they add nothing to the sum
    if (lb) h = h + load_f(lb + j, n);
    if (b) h = h + load_f(b + j, n);
    if (c) h = h + load_f(c + j, n);
    store_f(buf + j, h, n);
    acc = acc + h;
  }
  const float mean = hsum(acc + acc_b) / static_cast<float>(H);
  const Vec vmean(mean);
  // pass 2 (over the cached row): biased variance as the mean of squared deviations
  Vec acc2(0.f);
  for (j = 0; j < H; j += kVec) {
    const int64_t n = std::min(kVec, H - j);
    Vec d = load_f(buf + j, n) - vmean;
    if (n < kVec) d = Vec::set(Vec(0.f), d, n);  // tail lanes would hold -mean
    acc2 = at::vec::fmadd(d, d, acc2);
  }
  const float var = hsum(acc2) / static_cast<float>(H);
  const Vec vrstd(1.f / std::sqrt(var + eps));  // eps exactly as given, never clamped
  // pass 3: normalize, scale, shift, one rounding to T
  j = 0;
  for (; j + 2 * kVec <= H; j += 2 * kVec) {
    const Vec h0 = (Vec::loadu(buf + j) - vmean) * vrstd, h1 = (Vec::loadu(buf + j + kVec) - vmean) * vrstd;
    store2_f(y + j, at::vec::fmadd(h0, Vec::loadu(w + j), Vec::loadu(bias + j)),
             at::vec::fmadd(h1, Vec::loadu(w + j + kVec), Vec::loadu(bias + j + kVec)));
  }
  for (; j < H; j += kVec) {
    const int64_t n = std::min(kVec, H - j);
    const Vec hn = (load_f(buf + j, n) - vmean) * vrstd;
    store_f(y + j, at::vec::fmadd(hn, load_f(w + j, n), load_f(bias + j, n)), n);
  }
}

// (..., H) -> (rows, H) view when the leading dims collapse, else a contiguous copy.
at::Tensor as_rows(const at::Tensor& t, int64_t H) { return t.reshape({-1, H}); }

}  // namespace

at::Tensor bias_residual_layer_norm_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                        double eps, const std::optional<at::Tensor>& linear_bias,
                                        const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "bias_residual_layer_norm";
  check_cpu(op, "x", x);
  check_float_dtype(op, "x", x);
  check_last_dim_contiguous(op, "x", x);
  const int64_t H = x.size(-1);
  TORCH_CHECK(H > 0, op, ": the normalized (last) dimension of x must be non-empty, got shape ", x.sizes());
  check_vector(op, "weight", weight, H);
  check_vector(op, "bias", bias, H);
  if (linear_bias) check_vector(op, "linear_bias", *linear_bias, H);
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual shape ", residual->sizes(), " != x shape ",
                x.sizes());
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), op, ": residual dtype ",
                dtype_name(residual->scalar_type()), " != x dtype ", dtype_name(x.scalar_type()));
    check_cpu(op, "residual", *residual);
    check_last_dim_contiguous(op, "residual", *residual);
  }
  const at::Tensor w = param_f32(weight), b = param_f32(bias);
  const at::Tensor lb = linear_bias ? param_f32(*linear_bias) : at::Tensor();
  const at::Tensor x2 = as_rows(x, H);
  const at::Tensor r2 = residual ? as_rows(*residual, H) : at::Tensor();
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
      std::vector<float> buf(H);
      for (int64_t r = r0; r < r1; ++r) {
        ln_row<scalar_t>(xp + r * ldx, lbp, rp ? rp + r * ldr : nullptr, nullptr, wp, bp, feps, yp + r * H, H,
                         buf.data());
      }
    });
  });
  return y;
}

Activation parse_activation(c10::string_view name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  TORCH_CHECK(false, "bias_act: unknown activation '", std::string(name), "'; expected gelu, gelu_tanh or relu");
}

namespace {

template <Activation A>
inline Vec activate(const Vec& h) {
  if constexpr (A == Activation::kGelu) {
    // exact GELU, 0.5 x (1 + erf(x / sqrt 2)), as ATen's vectorized GELU kernel computes it
    return Vec(0.5f) * h * (Vec(1.f) + (h * Vec(static_cast<float>(M_SQRT1_2))).erf());
  } else if constexpr (A == Activation::kGeluTanh) {
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

template <typename T, Activation A>
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
  const Activation act = parse_activation(activation);
  check_cpu(op, "x", x);
  check_float_dtype(op, "x", x);
  check_last_dim_contiguous(op, "x", x);
  const int64_t I = x.size(-1);
  if (bias) check_vector(op, "bias", *bias, I);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return y;
  const at::Tensor x2 = as_rows(x, I);
  const at::Tensor b = bias ? param_f32(*bias) : at::Tensor();
  const int64_t M = x2.size(0);
  BF_DISPATCH_FLOAT_TYPES(x.scalar_type(), op, [&] {
    const scalar_t* xp = x2.const_data_ptr<scalar_t>();
    const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    switch (act) {
      case Activation::kGelu:
        bias_act_rows<scalar_t, Activation::kGelu>(xp, x2.stride(0), bp, yp, M, I);
        break;
      case Activation::kGeluTanh:
        bias_act_rows<scalar_t, Activation::kGeluTanh>(xp, x2.stride(0), bp, yp, M, I);
        break;
      case Activation::kRelu:
        bias_act_rows<scalar_t, Activation::kRelu>(xp, x2.stride(0), bp, yp, M, I);
        break;
    }
  });
  return y;
}

namespace {

at::Tensor ids_i64(const char* name, const at::Tensor& ids, const at::Tensor& like) {
  check_cpu("embed_layer_norm", name, ids);
  check_index_dtype("embed_layer_norm", name, ids);
  TORCH_CHECK(ids.sizes() == like.sizes(), "embed_layer_norm: ", name, " shape ", ids.sizes(),
              " != position_ids shape ", like.sizes());
  return ids.to(at::kLong).contiguous();
}

void check_table(const char* name, const at::Tensor& t, int64_t H, at::ScalarType dt) {
  check_cpu("embed_layer_norm", name, t);
  TORCH_CHECK(t.dim() == 2 && t.size(1) == H, "embed_layer_norm: ", name, " must have shape (rows, ", H, "), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, "embed_layer_norm: ", name, " dtype ", dtype_name(t.scalar_type()),
              " != word embeddings dtype ", dtype_name(dt));
  check_last_dim_contiguous("embed_layer_norm", name, t);
}

inline int64_t checked_row(const char* name, int64_t id, int64_t rows) {
  TORCH_CHECK(id >= 0 && id < rows, "embed_layer_norm: ", name, " value ", id, " is out of range [0, ", rows, ")");
  return id;
}

}  // namespace

at::Tensor embed_layer_norm_cpu(const std::optional<at::Tensor>& input_ids, const at::Tensor& position_ids,
                                const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb,
                                const at::Tensor& pos_emb, const at::Tensor& type_emb, const at::Tensor& weight,
                                const at::Tensor& bias, double eps, const std::optional<at::Tensor>& inputs_embeds) {
  constexpr const char* op = "embed_layer_norm";
  TORCH_CHECK(input_ids.has_value() || inputs_embeds.has_value(), op, ": give input_ids or inputs_embeds");
  check_float_dtype(op, "word_emb", word_emb);
  TORCH_CHECK(word_emb.dim() == 2, op, ": word_emb must be 2-D (vocab, hidden), got shape ", word_emb.sizes());
  const int64_t H = word_emb.size(1);
  TORCH_CHECK(H > 0, op, ": hidden size must be positive");
  const at::ScalarType dt = word_emb.scalar_type();
  check_table("word_emb", word_emb, H, dt);
  check_table("pos_emb", pos_emb, H, dt);
  check_table("type_emb", type_emb, H, dt);
  TORCH_CHECK(type_emb.size(0) >= 1, op, ": type_emb needs at least one row");
  check_vector(op, "weight", weight, H);
  check_vector(op, "bias", bias, H);
  const at::Tensor pos = ids_i64("position_ids", position_ids, position_ids);
  const at::Tensor ids = (!inputs_embeds && input_ids) ? ids_i64("input_ids", *input_ids, position_ids) : at::Tensor();
  const at::Tensor tt = token_type_ids ? ids_i64("token_type_ids", *token_type_ids, position_ids) : at::Tensor();
  at::Tensor emb;
  if (inputs_embeds) {
    check_cpu(op, "inputs_embeds", *inputs_embeds);
    std::vector<int64_t> want(position_ids.sizes().begin(), position_ids.sizes().end());
    want.push_back(H);
    TORCH_CHECK(inputs_embeds->sizes() == at::IntArrayRef(want), op, ": inputs_embeds shape ",
                inputs_embeds->sizes(), " != ", at::IntArrayRef(want));
    TORCH_CHECK(inputs_embeds->scalar_type() == dt, op, ": inputs_embeds dtype ",
                dtype_name(inputs_embeds->scalar_type()), " != embeddings dtype ", dtype_name(dt));
    check_last_dim_contiguous(op, "inputs_embeds", *inputs_embeds);
    emb = as_rows(*inputs_embeds, H);
  }
  std::vector<int64_t> out_shape(position_ids.sizes().begin(), position_ids.sizes().end());
  out_shape.push_back(H);
  at::Tensor y = at::empty(out_shape, word_emb.options());
  const int64_t N = pos.numel();
  if (N == 0) return y;
  const at::Tensor w = param_f32(weight), b = param_f32(bias);
  const float feps = static_cast<float>(eps);
  BF_DISPATCH_FLOAT_TYPES(dt, op, [&] {
    const scalar_t* we = word_emb.const_data_ptr<scalar_t>();
    const scalar_t* pe = pos_emb.const_data_ptr<scalar_t>();
    const scalar_t* te = type_emb.const_data_ptr<scalar_t>();
    const int64_t ldw = word_emb.stride(0), ldp = pos_emb.stride(0), ldt = type_emb.stride(0);
    const int64_t Vw = word_emb.size(0), Vp = pos_emb.size(0), Vt = type_emb.size(0);
    const scalar_t* ep = emb.defined() ? emb.const_data_ptr<scalar_t>() : nullptr;
    const int64_t lde = emb.defined() ? emb.stride(0) : 0;
    const int64_t* idp = ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr;
    const int64_t* ttp = tt.defined() ? tt.const_data_ptr<int64_t>() : nullptr;
    const int64_t* pp = pos.const_data_ptr<int64_t>();
    const float* wp = w.const_data_ptr<float>();
    const float* bp = b.const_data_ptr<float>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(H), [&](int64_t t0, int64_t t1) {
      std::vector<float> buf(H);
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* a = ep ? ep + t * lde : we + checked_row("input_ids", idp[t], Vw) * ldw;
        const scalar_t* trow = te + (ttp ? checked_row("token_type_ids", ttp[t], Vt) : 0) * ldt;
        const scalar_t* prow = pe + checked_row("position_ids", pp[t], Vp) * ldp;
        // (word + token_type) + position, HF's order
        ln_row<scalar_t>(a, nullptr, trow, prow, wp, bp, feps, yp + t * H, H, buf.data());
      }
    });
  });
  return y;
}

}  // namespace bert_fast
