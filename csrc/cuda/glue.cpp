// The CUDA implementations of bert_fast's operators (registered in csrc/ops.cpp in a WITH_CUDA
// build): the op's validator from csrc/contracts.h (the same one the CPU kernel calls), a device
// guard, then either a C launcher of csrc/cuda/kernels.cuh (our kernels, in the .cu files beside
// this one, which include no torch headers) or ATen's own CUDA ops (cuBLAS GEMMs, flash /
// memory-efficient attention, nonzero/cumsum). One file for all ops: the glue of an op is a dozen
// lines of tensor plumbing around its launcher.
//
// Value checks on CUDA (the CPU kernels check each value as they read it, for free):
// * ids (embed_layer_norm) and indices (gather_rows, scatter_rows): check_index_ranges, i.e. one
//   aminmax per index tensor (reads each index once) and one copy of the minima and maxima to the
//   host: one host sync per op call. Measured on an H100 (BERT-base 32 x 128, bf16, median of 7 x
//   200 calls), eager call vs CUDA-graph replay of the same op: embed_layer_norm 101 vs 18 us,
//   gather_rows (3000 of 4096 rows) 41 vs 4.6 us: in eager mode the check, not the kernel, is most
//   of the time of these ops. Skipped while the current stream is being captured into a
//   CUDA graph (a sync cannot be captured); the kernels bound-check every index themselves, so a
//   bad id or index then gives a NaN (0xff-filled) row, never an out-of-bounds access.
// * cu_seqlens (varlen_attention) is not read on the host (a sync in every layer): its offsets
//   are trusted, as unpad_mask produces them; shapes, dtypes and devices are checked.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <vector>

#include "../contracts.h"
#include "../ops.h"
#include "kernels.cuh"

namespace bert_fast {

namespace {

bf_dtype_t dtype_code(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return BF_FLOAT32;
    case at::kHalf:
      return BF_FLOAT16;
    case at::kBFloat16:
      return BF_BFLOAT16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype_name(t.scalar_type()),
                  "; expected float32, float16 or bfloat16");
  }
}

void check_status(const char* op, int status) {
  TORCH_CHECK(status == 0, op, ": CUDA kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
}

void* stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// check_index_ranges, unless the current stream (of the guarded device) is being captured into a
// CUDA graph (see the file comment).
void check_index_ranges_eager(const char* op, std::initializer_list<IndexRange> checks) {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    check_index_ranges(op, checks);
  }
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

at::Tensor i64(const at::Tensor& t) { return t.to(at::kLong).contiguous(); }

}  // namespace

at::Tensor bias_residual_layer_norm_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                         double eps, const std::optional<at::Tensor>& linear_bias,
                                         const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "bias_residual_layer_norm";
  const int64_t H = check_bias_residual_layer_norm(x, weight, bias, linear_bias, residual);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({-1, H});
  const at::Tensor r2 = residual ? residual->reshape({-1, H}) : at::Tensor();
  const at::Tensor w = param_f32(weight), b = param_f32(bias);
  const at::Tensor lb = linear_bias ? param_f32(*linear_bias) : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  check_status(op, bf_bias_residual_layer_norm(dtype_code(op, x), x2.const_data_ptr(), x2.stride(0),
                                               r2.defined() ? r2.const_data_ptr() : nullptr,
                                               r2.defined() ? r2.stride(0) : 0, ptr_or_null<float>(lb),
                                               w.const_data_ptr<float>(), b.const_data_ptr<float>(),
                                               static_cast<float>(eps), y.data_ptr(), x2.size(0), H, stream_of(x)));
  return y;
}

at::Tensor bias_act_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view activation) {
  constexpr const char* op = "bias_act";
  const bf_act_t act = check_bias_act(x, bias, activation);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return y;
  const int64_t I = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, I});
  const at::Tensor b = bias ? param_f32(*bias) : at::Tensor();
  check_status(op, bf_bias_act(dtype_code(op, x), x2.const_data_ptr(), x2.stride(0), ptr_or_null<float>(b), act,
                               y.data_ptr(), x2.size(0), I, stream_of(x)));
  return y;
}

at::Tensor embed_layer_norm_cuda(const std::optional<at::Tensor>& input_ids, const at::Tensor& position_ids,
                                 const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb,
                                 const at::Tensor& pos_emb, const at::Tensor& type_emb, const at::Tensor& weight,
                                 const at::Tensor& bias, double eps, const std::optional<at::Tensor>& inputs_embeds) {
  constexpr const char* op = "embed_layer_norm";
  const int64_t H = check_embed_layer_norm(input_ids, position_ids, token_type_ids, word_emb, pos_emb, type_emb,
                                           weight, bias, inputs_embeds);
  c10::cuda::CUDAGuard guard(word_emb.device());
  const at::Tensor pos = i64(position_ids);
  const at::Tensor ids = (!inputs_embeds && input_ids) ? i64(*input_ids) : at::Tensor();
  const at::Tensor tt = token_type_ids ? i64(*token_type_ids) : at::Tensor();
  check_index_ranges_eager(op, {{"input_ids value", ids, word_emb.size(0)},
                                {"token_type_ids value", tt, type_emb.size(0)},
                                {"position_ids value", pos, pos_emb.size(0)}});
  const at::Tensor emb = inputs_embeds ? inputs_embeds->reshape({-1, H}) : at::Tensor();
  std::vector<int64_t> shape(position_ids.sizes().begin(), position_ids.sizes().end());
  shape.push_back(H);
  at::Tensor y = at::empty(shape, word_emb.options());
  const at::Tensor w = param_f32(weight), b = param_f32(bias);
  check_status(op, bf_embed_layer_norm(dtype_code(op, word_emb), ptr_or_null<int64_t>(ids),
                                       emb.defined() ? emb.const_data_ptr() : nullptr,
                                       emb.defined() ? emb.stride(0) : 0, pos.const_data_ptr<int64_t>(),
                                       ptr_or_null<int64_t>(tt), word_emb.const_data_ptr(), word_emb.stride(0),
                                       word_emb.size(0), pos_emb.const_data_ptr(), pos_emb.stride(0),
                                       pos_emb.size(0), type_emb.const_data_ptr(), type_emb.stride(0),
                                       type_emb.size(0), w.const_data_ptr<float>(), b.const_data_ptr<float>(),
                                       static_cast<float>(eps), y.data_ptr(), pos.numel(), H, stream_of(word_emb)));
  return y;
}

// Attention over packed sequences through ATen's fused kernels, which take cu_seqlens natively:
// FlashAttention-2 (ATen's _flash_attention_forward, varlen mode: (tokens, heads, head_dim) in, the
// same out) for fp16/bf16, the memory-efficient kernel (_efficient_attention_forward, batch 1 with
// cu_seqlens) for fp32. Both compute the softmax in fp32 and never materialize the scores. Their
// own limits apply (flash: sm_80 or newer, head_dim <= 256; both: a clear ATen error otherwise).
// Measured on an H100 against a per-sequence fp32 reference: fp32/bf16/fp16, head_dim 26/32/64/128.
at::Tensor varlen_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale) {
  check_varlen_attention(q, k, v, cu_seqlens, scale);
  TORCH_CHECK(max_seqlen >= 0, "varlen_attention: max_seqlen must be >= 0, got ", max_seqlen);
  c10::cuda::CUDAGuard guard(q.device());
  if (q.numel() == 0) return at::zeros(q.sizes(), q.options());
  const at::Tensor cu = cu_seqlens.to(at::kInt).contiguous();
  // Both kernels want head_dim a multiple of 8 (16 bytes in 16-bit) and 16-byte aligned rows. Other
  // head dims (TinyBERT's 26) are zero-padded: zero columns add nothing to q.k, the padded output
  // columns are dropped, and the scale is passed explicitly. That costs one copy of q, k, v.
  const int64_t d = q.size(2), d8 = (d + 7) / 8 * 8;
  const int64_t align = 16 / q.element_size();
  auto ready = [&](const at::Tensor& t) {
    if (d8 != d) return at::constant_pad_nd(t, {0, d8 - d});
    return t.stride(0) % align == 0 && t.stride(1) % align == 0 ? t : t.contiguous();
  };
  at::Tensor out;
  if (q.scalar_type() != at::kFloat) {
    out = std::get<0>(at::_flash_attention_forward(ready(q), ready(k), ready(v), cu, cu, max_seqlen, max_seqlen, 0.0,
                                                   /*is_causal=*/false, /*return_debug_mask=*/false,
                                                   std::optional<double>(scale)));
  } else {
    out = std::get<0>(at::_efficient_attention_forward(
                          ready(q).unsqueeze(0), ready(k).unsqueeze(0), ready(v).unsqueeze(0), /*bias=*/std::nullopt,
                          cu, cu, max_seqlen, max_seqlen, 0.0, /*custom_mask_type=*/0,
                          /*compute_log_sumexp=*/false, std::optional<double>(scale)))
              .squeeze(0);
  }
  return d8 == d ? out : out.narrow(2, 0, d).contiguous();
}

// One nonzero and one cumsum, PyTorch's own CUDA kernels (as the torch reference does).
std::tuple<at::Tensor, at::Tensor, at::Tensor> unpad_mask_cuda(const at::Tensor& mask) {
  check_unpad_mask(mask);
  c10::cuda::CUDAGuard guard(mask.device());
  const at::Tensor valid = mask.ne(0);
  const at::Tensor lens = valid.sum(1, /*keepdim=*/false, at::kInt);
  at::Tensor cu = at::zeros({mask.size(0) + 1}, mask.options().dtype(at::kInt));
  if (mask.size(0) > 0) cu.narrow(0, 1, mask.size(0)).copy_(at::cumsum(lens, 0, at::kInt));
  const at::Tensor indices = at::nonzero(valid.flatten()).flatten();
  const at::Tensor mx = mask.size(0) > 0 ? lens.max() : at::zeros({}, lens.options());
  return {indices, cu, mx};
}

at::Tensor gather_rows_cuda(const at::Tensor& x_in, const at::Tensor& indices) {
  constexpr const char* op = "gather_rows";
  check_gather_rows(x_in, indices);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), idx = i64(indices);
  check_index_ranges_eager(op, {{"index", idx, x.size(0)}});
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = idx.size(0);
  at::Tensor out = at::empty(shape, x.options());
  const int64_t row_bytes = x.size(0) > 0 ? x.nbytes() / x.size(0) : 0;
  check_status(op, bf_gather_rows(x.const_data_ptr(), x.size(0), idx.const_data_ptr<int64_t>(), out.data_ptr(),
                                  idx.size(0), row_bytes, stream_of(x)));
  return out;
}

at::Tensor scatter_rows_cuda(const at::Tensor& x_in, const at::Tensor& indices, int64_t num_rows) {
  constexpr const char* op = "scatter_rows";
  check_scatter_rows(x_in, indices, num_rows);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), idx = i64(indices);
  check_index_ranges_eager(op, {{"index", idx, num_rows}});
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = num_rows;
  at::Tensor out = at::empty(shape, x.options());
  const int64_t row_bytes = num_rows > 0 ? out.nbytes() / num_rows : 0;
  check_status(op, bf_scatter_rows(x.const_data_ptr(), idx.const_data_ptr<int64_t>(), out.data_ptr(), idx.size(0),
                                   num_rows, row_bytes, stream_of(x)));
  return out;
}

// x weight^T + bias through ATen's CUDA linear (cuBLAS / cuBLASLt, bias fused into the GEMM
// epilogue where ATen does so). The CPU op's row split exists for oneDNN's threading and has no
// GPU counterpart; the weight is the plain (out_features, in_features) tensor, as on the CPU.
at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear(x, weight, bias);
  c10::cuda::CUDAGuard guard(x.device());
  return at::linear(x, weight, bias);
}

}  // namespace bert_fast

#endif  // WITH_CUDA
