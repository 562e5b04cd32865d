// Declarations of the CPU kernels of bert_fast._C (registered in ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace bert_fast {

at::Tensor bias_residual_layer_norm_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                        double eps, const std::optional<at::Tensor>& linear_bias,
                                        const std::optional<at::Tensor>& residual);

at::Tensor bias_act_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view activation);

at::Tensor embed_layer_norm_cpu(const std::optional<at::Tensor>& input_ids, const at::Tensor& position_ids,
                                const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb,
                                const at::Tensor& pos_emb, const at::Tensor& type_emb, const at::Tensor& weight,
                                const at::Tensor& bias, double eps, const std::optional<at::Tensor>& inputs_embeds);

at::Tensor varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> unpad_mask_cpu(const at::Tensor& mask);

at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& indices);

at::Tensor scatter_rows_cpu(const at::Tensor& x, const at::Tensor& indices, int64_t num_rows);

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// Activation codes shared with the CUDA glue.
enum class Activation : int { kGelu = 0, kGeluTanh = 1, kRelu = 2 };
Activation parse_activation(c10::string_view name);

}  // namespace bert_fast
