// The contract of every operator of bert_fast._C, written once: one validator per op, called first
// by the CPU kernel (csrc/cpu/<op>.cpp) and by the CUDA glue (csrc/cuda/glue.cpp) alike. A
// validator checks dtypes, devices (every tensor on the device of the op's main input), shapes and
// strides, and returns what the kernel needs (sizes, the activation code). Messages name the op, the
// argument, the value and what was expected.
//
// Value ranges (ids, indices, cu_seqlens) need the values on the host. The CPU kernels check them
// inside their own loop over the data (free); the CUDA glue checks ids and indices with
// check_index_ranges below (reductions on the device and one small copy back: one host sync per
// call) and does not read cu_seqlens (see glue.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/cat.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "activation.h"

namespace bert_fast {

// ---- building blocks ---------------------------------------------------------------------------

inline std::string dtype_name(at::ScalarType t) { return std::string(c10::toString(t)); }

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                              const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ", like.device(),
              " (the device of ", like_name, "); move all inputs to one device");
}

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dtype_name(dt));
}

inline void check_dropout_p(const char* op, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
}

inline void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least one dimension");
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must be contiguous in its last dimension (stride(-1) == 1), got stride ", t.stride(-1));
}

inline void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape (", n, ",), got ", t.sizes());
}

inline void check_index_dtype(const char* op, const char* name, const at::Tensor& t) {
  auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kLong || dt == at::kInt, op, ": ", name, " must be int64 or int32, got ", dtype_name(dt));
}

// A 1-D parameter of n elements (weight, bias) on the device of `like`, of a floating dtype (any:
// the kernels read parameters as fp32, see param_f32).
inline void check_param(const char* op, const char* name, const at::Tensor& t, int64_t n, const at::Tensor& like,
                        const char* like_name) {
  check_vector(op, name, t, n);
  check_same_device(op, name, t, like, like_name);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
              dtype_name(t.scalar_type()));
}

// An index tensor: int32/int64, on the device of `like`, of the same shape as `shape_of` when given.
inline void check_index_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                               const char* like_name, const at::Tensor* shape_of = nullptr,
                               const char* shape_name = nullptr) {
  check_same_device(op, name, t, like, like_name);
  check_index_dtype(op, name, t);
  if (shape_of) {
    TORCH_CHECK(t.sizes() == shape_of->sizes(), op, ": ", name, " shape ", t.sizes(), " != ", shape_name, " shape ",
                shape_of->sizes());
  }
}

// One index value against [0, rows); `label` reads e.g. "index" or "input_ids value".
inline void check_in_range(const char* op, const char* label, int64_t v, int64_t rows) {
  TORCH_CHECK(v >= 0 && v < rows, op, ": ", label, " ", v, " is out of range [0, ", rows, ")");
}

// Every value of each index tensor in [0, rows), on any device: one aminmax per tensor where it
// lives, and one copy of all the minima and maxima to the host together (on CUDA: one host sync
// per call, whatever the number of tensors). Undefined or empty tensors are skipped. The CPU
// kernels do not call this; they check each value in the loop that reads it.
struct IndexRange {
  const char* label;  // e.g. "index", "input_ids value"
  at::Tensor idx;
  int64_t rows;
};

inline void check_index_ranges(const char* op, std::initializer_list<IndexRange> checks) {
  std::vector<at::Tensor> parts;
  for (const IndexRange& c : checks) {
    if (!c.idx.defined() || c.idx.numel() == 0) continue;
    const auto mm = at::aminmax(c.idx);
    parts.push_back(std::get<0>(mm).reshape({1}).to(at::kLong));
    parts.push_back(std::get<1>(mm).reshape({1}).to(at::kLong));
  }
  if (parts.empty()) return;
  const at::Tensor host = at::cat(parts).to(at::kCPU);
  const int64_t* v = host.const_data_ptr<int64_t>();
  for (const IndexRange& c : checks) {
    if (!c.idx.defined() || c.idx.numel() == 0) continue;
    check_in_range(op, c.label, *v++, c.rows);  // the minimum first: a negative value is reported as such
    check_in_range(op, c.label, *v++, c.rows);
  }
}

// A 1-D parameter (weight, bias) as a contiguous fp32 tensor on its device: parameters are tiny (H
// elements), so converting them once per call costs nothing and lets one kernel serve fp32
// parameters with bf16/fp16 activations too. The user's tensor is never modified.
inline at::Tensor param_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// ---- bias_residual_layer_norm(x, weight, bias, eps, linear_bias?, residual?) -> hidden size H ------

inline int64_t check_bias_residual_layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                              const std::optional<at::Tensor>& linear_bias,
                                              const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "bias_residual_layer_norm";
  check_float_dtype(op, "x", x);
  check_last_dim_contiguous(op, "x", x);
  const int64_t H = x.size(-1);
  TORCH_CHECK(H > 0, op, ": the normalized (last) dimension of x must be non-empty, got shape ", x.sizes());
  check_param(op, "weight", weight, H, x, "x");
  check_param(op, "bias", bias, H, x, "x");
  if (linear_bias) check_param(op, "linear_bias", *linear_bias, H, x, "x");
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual shape ", residual->sizes(), " != x shape ",
                x.sizes());
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), op, ": residual dtype ",
                dtype_name(residual->scalar_type()), " != x dtype ", dtype_name(x.scalar_type()));
    check_same_device(op, "residual", *residual, x, "x");
    check_last_dim_contiguous(op, "residual", *residual);
  }
  return H;
}

// ---- bias_act(x, bias?, activation) -> activation code ----------------------------------------------

inline bf_act_t parse_activation(c10::string_view name) {
  if (name == "gelu") return BF_ACT_GELU;
  if (name == "gelu_tanh") return BF_ACT_GELU_TANH;
  if (name == "relu") return BF_ACT_RELU;
  TORCH_CHECK(false, "bias_act: unknown activation '", std::string(name), "'; expected gelu, gelu_tanh or relu");
}

inline bf_act_t check_bias_act(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                               c10::string_view activation) {
  constexpr const char* op = "bias_act";
  const bf_act_t act = parse_activation(activation);
  check_float_dtype(op, "x", x);
  check_last_dim_contiguous(op, "x", x);
  if (bias) check_param(op, "bias", *bias, x.size(-1), x, "x");
  return act;
}

// ---- backward ops (CPU): the forward op's contract plus grad, shaped and typed like x -------------

inline void check_grad_like(const char* op, const at::Tensor& grad, const at::Tensor& x, const char* x_name = "x") {
  TORCH_CHECK(grad.sizes() == x.sizes(), op, ": grad shape ", grad.sizes(), " != ", x_name, " shape ", x.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad dtype ", dtype_name(grad.scalar_type()), " != ",
              x_name, " dtype ", dtype_name(x.scalar_type()));
  check_same_device(op, "grad", grad, x, x_name);
  check_last_dim_contiguous(op, "grad", grad);
}

inline bf_act_t check_bias_act_bwd(const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                   c10::string_view activation) {
  const bf_act_t act = check_bias_act(x, bias, activation);
  check_grad_like("bias_act_bwd", grad, x);
  return act;
}

inline int64_t check_bias_residual_layer_norm_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                  const at::Tensor& weight, const at::Tensor& bias,
                                                  const std::optional<at::Tensor>& linear_bias,
                                                  const std::optional<at::Tensor>& residual) {
  const int64_t H = check_bias_residual_layer_norm(x, weight, bias, linear_bias, residual);
  check_grad_like("bias_residual_layer_norm_bwd", grad, x);
  return H;
}

// ---- embed_layer_norm(input_ids?, position_ids, token_type_ids?, word_emb, pos_emb, type_emb,
//      weight, bias, eps, inputs_embeds?) -> hidden size H --------------------------------------------
// Id ranges: checked by the CPU kernel as it reads each id, by the CUDA glue with check_index_ranges.
// input_ids are ignored (not checked) when inputs_embeds is given.

inline int64_t check_embed_layer_norm(const std::optional<at::Tensor>& input_ids, const at::Tensor& position_ids,
                                      const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb,
                                      const at::Tensor& pos_emb, const at::Tensor& type_emb,
                                      const at::Tensor& weight, const at::Tensor& bias,
                                      const std::optional<at::Tensor>& inputs_embeds) {
  constexpr const char* op = "embed_layer_norm";
  TORCH_CHECK(input_ids.has_value() || inputs_embeds.has_value(), op, ": give input_ids or inputs_embeds");
  check_float_dtype(op, "word_emb", word_emb);
  TORCH_CHECK(word_emb.dim() == 2, op, ": word_emb must be 2-D (vocab, hidden), got shape ", word_emb.sizes());
  const int64_t H = word_emb.size(1);
  TORCH_CHECK(H > 0, op, ": hidden size must be positive");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"word_emb", &word_emb},
                                {"pos_emb", &pos_emb},
                                {"type_emb", &type_emb}}) {
    check_same_device(op, name, *t, word_emb, "word_emb");
    TORCH_CHECK(t->dim() == 2 && t->size(1) == H, op, ": ", name, " must have shape (rows, ", H, "), got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == word_emb.scalar_type(), op, ": ", name, " dtype ", dtype_name(t->scalar_type()),
                " != word embeddings dtype ", dtype_name(word_emb.scalar_type()));
    check_last_dim_contiguous(op, name, *t);
  }
  TORCH_CHECK(type_emb.size(0) >= 1, op, ": type_emb needs at least one row");
  check_param(op, "weight", weight, H, word_emb, "word_emb");
  check_param(op, "bias", bias, H, word_emb, "word_emb");
  check_index_tensor(op, "position_ids", position_ids, word_emb, "word_emb");
  if (!inputs_embeds && input_ids) {
    check_index_tensor(op, "input_ids", *input_ids, word_emb, "word_emb", &position_ids, "position_ids");
  }
  if (token_type_ids) {
    check_index_tensor(op, "token_type_ids", *token_type_ids, word_emb, "word_emb", &position_ids, "position_ids");
  }
  if (inputs_embeds) {
    check_same_device(op, "inputs_embeds", *inputs_embeds, word_emb, "word_emb");
    std::vector<int64_t> want(position_ids.sizes().begin(), position_ids.sizes().end());
    want.push_back(H);
    TORCH_CHECK(inputs_embeds->sizes() == at::IntArrayRef(want), op, ": inputs_embeds shape ",
                inputs_embeds->sizes(), " != ", at::IntArrayRef(want));
    TORCH_CHECK(inputs_embeds->scalar_type() == word_emb.scalar_type(), op, ": inputs_embeds dtype ",
                dtype_name(inputs_embeds->scalar_type()), " != embeddings dtype ",
                dtype_name(word_emb.scalar_type()));
    check_last_dim_contiguous(op, "inputs_embeds", *inputs_embeds);
  }
  return H;
}

// embed_layer_norm_bwd: the forward's contract plus grad, shaped (tokens, H) like the output and of
// the tables' dtype.
inline int64_t check_embed_layer_norm_bwd(const at::Tensor& grad, const std::optional<at::Tensor>& input_ids,
                                          const at::Tensor& position_ids,
                                          const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb,
                                          const at::Tensor& pos_emb, const at::Tensor& type_emb,
                                          const at::Tensor& weight, const at::Tensor& bias,
                                          const std::optional<at::Tensor>& inputs_embeds) {
  constexpr const char* op = "embed_layer_norm_bwd";
  const int64_t H = check_embed_layer_norm(input_ids, position_ids, token_type_ids, word_emb, pos_emb, type_emb,
                                           weight, bias, inputs_embeds);
  std::vector<int64_t> want(position_ids.sizes().begin(), position_ids.sizes().end());
  want.push_back(H);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(want), op, ": grad shape ", grad.sizes(), " != output shape ",
              at::IntArrayRef(want));
  TORCH_CHECK(grad.scalar_type() == word_emb.scalar_type(), op, ": grad dtype ", dtype_name(grad.scalar_type()),
              " != word_emb dtype ", dtype_name(word_emb.scalar_type()));
  check_same_device(op, "grad", grad, word_emb, "word_emb");
  check_last_dim_contiguous(op, "grad", grad);
  return H;
}

// ---- varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale) ------------------------------------------
// q, k, v: (tokens, heads, head_dim), one dtype, one device, last dim contiguous; cu_seqlens: 1-D
// int32/int64 offsets of batch + 1 sequences. The values of cu_seqlens: check_cu_seqlens_values.

inline void check_varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& cu_seqlens, double scale) {
  constexpr const char* op = "varlen_attention";
  check_float_dtype(op, "q", q);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    check_same_device(op, name, *t, q, "q");
    TORCH_CHECK(t->dim() == 3, op, ": ", name, " must be (tokens, heads, head_dim), got shape ", t->sizes());
    TORCH_CHECK(t->sizes() == q.sizes(), op, ": ", name, " shape ", t->sizes(), " != q shape ", q.sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " dtype ", dtype_name(t->scalar_type()),
                " != q dtype ", dtype_name(q.scalar_type()));
    check_last_dim_contiguous(op, name, *t);
  }
  check_index_tensor(op, "cu_seqlens", cu_seqlens, q, "q");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, op,
              ": cu_seqlens must be a 1-D tensor of batch + 1 offsets, got shape ", cu_seqlens.sizes());
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

// The offsets themselves (host memory, B + 1 of them) against the token count N and max_seqlen;
// returns the longest length.
inline int64_t check_cu_seqlens_values(const int64_t* cu, int64_t B, int64_t N, int64_t max_seqlen) {
  constexpr const char* op = "varlen_attention";
  TORCH_CHECK(cu[0] == 0, op, ": cu_seqlens[0] must be 0, got ", cu[0]);
  TORCH_CHECK(cu[B] == N, op, ": cu_seqlens[-1] = ", cu[B], " must equal the number of tokens ", N);
  int64_t lmax = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = cu[b + 1] - cu[b];
    TORCH_CHECK(len >= 0, op, ": cu_seqlens must be non-decreasing, got ", cu[b], " then ", cu[b + 1]);
    TORCH_CHECK(len <= max_seqlen, op, ": sequence ", b, " has length ", len, " > max_seqlen ", max_seqlen);
    lmax = std::max(lmax, len);
  }
  return lmax;
}

inline void check_varlen_attention_bwd(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& cu_seqlens, double scale) {
  check_varlen_attention(q, k, v, cu_seqlens, scale);
  check_grad_like("varlen_attention_bwd", grad, q, "q");
}

// ---- padding: unpad_mask(mask), gather_rows(x, indices), scatter_rows(x, indices, num_rows) -----------
// Index ranges: the CPU kernels check each index as they copy; the CUDA glue uses check_index_ranges.

inline void check_unpad_mask(const at::Tensor& mask) {
  TORCH_CHECK(mask.dim() == 2, "unpad_mask: expected a (batch, seq_len) mask, got shape ", mask.sizes());
}

inline void check_rows_and_indices(const char* op, const at::Tensor& x, const at::Tensor& indices) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a row dimension, got a 0-d tensor");
  check_index_tensor(op, "indices", indices, x, "x");
  TORCH_CHECK(indices.dim() == 1, op, ": indices must be 1-D, got shape ", indices.sizes());
}

inline void check_gather_rows(const at::Tensor& x, const at::Tensor& indices) {
  check_rows_and_indices("gather_rows", x, indices);
}

inline void check_scatter_rows(const at::Tensor& x, const at::Tensor& indices, int64_t num_rows) {
  constexpr const char* op = "scatter_rows";
  check_rows_and_indices(op, x, indices);
  TORCH_CHECK(num_rows >= 0, op, ": num_rows must be >= 0, got ", num_rows);
  TORCH_CHECK(indices.size(0) == x.size(0), op, ": indices has ", indices.size(0), " entries but x has ", x.size(0),
              " rows");
}

// ---- linear(x, weight, bias?) = x weight^T + bias ------------------------------------------------------
// weight: the plain (out_features, in_features) tensor on both devices (the oneDNN-prepacked weight
// of the CPU small-batch path never reaches this op).

inline void check_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "linear";
  check_same_device(op, "weight", weight, x, "x");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got ", weight.dim(), "-D");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), op, ": x has ", x.dim() >= 1 ? x.size(-1) : 0,
              " features in its last dim, weight expects ", weight.size(1));
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": x is ", dtype_name(x.scalar_type()), ", weight is ",
              dtype_name(weight.scalar_type()));
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ",
              dtype_name(x.scalar_type()));
  if (bias) {
    check_same_device(op, "bias", *bias, x, "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (",
                weight.size(0), "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias is ", dtype_name(bias->scalar_type()),
                ", x is ", dtype_name(x.scalar_type()));
  }
}

}  // namespace bert_fast
