// Declarations of the operators' implementations, registered in ops.cpp: the CPU kernels
// (csrc/cpu/<op>.cpp, `<op>_cpu`) and, in a WITH_CUDA build, the CUDA entry points
// (csrc/cuda/glue.cpp, `<op>_cuda`). Both take the arguments of the op's schema in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace bert_fast {

#define BERT_FAST_DECLARE_OPS(DEV)                                                                                  \
  at::Tensor bias_residual_layer_norm_##DEV(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,  \
                                            double eps, const std::optional<at::Tensor>& linear_bias,               \
                                            const std::optional<at::Tensor>& residual);                             \
  at::Tensor bias_act_##DEV(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view activation); \
  at::Tensor embed_layer_norm_##DEV(const std::optional<at::Tensor>& input_ids, const at::Tensor& position_ids,     \
                                    const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb,    \
                                    const at::Tensor& pos_emb, const at::Tensor& type_emb, const at::Tensor& weight, \
                                    const at::Tensor& bias, double eps,                                             \
                                    const std::optional<at::Tensor>& inputs_embeds);                                \
  at::Tensor varlen_attention_##DEV(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,                  \
                                    const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale);                \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> unpad_mask_##DEV(const at::Tensor& mask);                          \
  at::Tensor gather_rows_##DEV(const at::Tensor& x, const at::Tensor& indices);                                     \
  at::Tensor scatter_rows_##DEV(const at::Tensor& x, const at::Tensor& indices, int64_t num_rows);                  \
  at::Tensor linear_##DEV(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// Backward ops: CPU only (on the GPU the backward kernels are Triton's).
std::tuple<at::Tensor, at::Tensor> bias_act_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                    const std::optional<at::Tensor>& bias,
                                                    c10::string_view activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bias_residual_layer_norm_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& residual, double dropout_p,
    int64_t seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> embed_layer_norm_bwd_cpu(
    const at::Tensor& grad, const std::optional<at::Tensor>& input_ids, const at::Tensor& position_ids,
    const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb, const at::Tensor& pos_emb,
    const at::Tensor& type_emb, const at::Tensor& weight, const at::Tensor& bias, double eps,
    const std::optional<at::Tensor>& inputs_embeds);
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cpu(const at::Tensor& grad, const at::Tensor& q,
                                                                        const at::Tensor& k, const at::Tensor& v,
                                                                        const at::Tensor& cu_seqlens,
                                                                        int64_t max_seqlen, double scale,
                                                                        double dropout_p, int64_t seed);
// Forward ops with fused dropout: CPU only (the Triton kernels have no dropout yet).
at::Tensor varlen_attention_dropout_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale,
                                        double dropout_p, int64_t seed);
at::Tensor bias_residual_layer_norm_dropout_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                                double eps, const std::optional<at::Tensor>& linear_bias,
                                                const std::optional<at::Tensor>& residual, double dropout_p,
                                                int64_t seed);

// Small-batch fp32 GEMM on weights packed into 16-column panels (CPU only, AVX2 + FMA chosen at run
// time; csrc/cpu/sgemm_avx2.cpp).
bool sgemm_available_cpu();
at::Tensor sgemm_pack_cpu(const at::Tensor& weight);
at::Tensor sgemm_packed_linear_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t k,
                                   const std::optional<at::Tensor>& bias);

BERT_FAST_DECLARE_OPS(cpu)
#ifdef WITH_CUDA
BERT_FAST_DECLARE_OPS(cuda)
#endif

#undef BERT_FAST_DECLARE_OPS

}  // namespace bert_fast
