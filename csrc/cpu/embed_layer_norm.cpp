// embed_layer_norm on CPU: y[t] = LayerNorm((word[input_ids[t]] or inputs_embeds[t])
// + type[token_type_ids[t] or 0] + pos[position_ids[t]]) * weight + bias, one pass per token
// (csrc/cpu/layer_norm_row.h), tokens in parallel; each id is range-checked as it is read.
#include <vector>

#include "../contracts.h"
#include "../ops.h"
#include "layer_norm_row.h"

namespace bert_fast {

at::Tensor embed_layer_norm_cpu(const std::optional<at::Tensor>& input_ids, const at::Tensor& position_ids,
                                const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb,
                                const at::Tensor& pos_emb, const at::Tensor& type_emb, const at::Tensor& weight,
                                const at::Tensor& bias, double eps, const std::optional<at::Tensor>& inputs_embeds) {
  constexpr const char* op = "embed_layer_norm";
  const int64_t H =
      check_embed_layer_norm(input_ids, position_ids, token_type_ids, word_emb, pos_emb, type_emb, weight, bias,
                             inputs_embeds);
  const at::ScalarType dt = word_emb.scalar_type();
  auto i64 = [](const at::Tensor& t) { return t.to(at::kLong).contiguous(); };
  const at::Tensor pos = i64(position_ids);
  const at::Tensor ids = (!inputs_embeds && input_ids) ? i64(*input_ids) : at::Tensor();
  const at::Tensor tt = token_type_ids ? i64(*token_type_ids) : at::Tensor();
  const at::Tensor emb = inputs_embeds ? inputs_embeds->reshape({-1, H}) : at::Tensor();
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
    auto row = [&](const char* label, int64_t id, int64_t rows) {
      check_in_range(op, label, id, rows);
      return id;
    };
    at::parallel_for(0, N, row_grain(H), [&](int64_t t0, int64_t t1) {
      std::vector<float> buf(H);
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* a = ep ? ep + t * lde : we + row("input_ids value", idp[t], Vw) * ldw;
        const scalar_t* trow = te + (ttp ? row("token_type_ids value", ttp[t], Vt) : 0) * ldt;
        const scalar_t* prow = pe + row("position_ids value", pp[t], Vp) * ldp;
        // (word + token_type) + position, HF's order
        ln_row<scalar_t>(a, nullptr, trow, prow, wp, bp, feps, yp + t * H, H, buf.data());
      }
    });
  });
  return y;
}

}  // namespace bert_fast
