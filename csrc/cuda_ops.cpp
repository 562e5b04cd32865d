// CUDA dispatch-key registrations of bert_fast's operators: argument checks and tensor plumbing
// around the C launchers of csrc/cuda/kernels.cuh. Compiled only when setup.py builds the CUDA
// kernels (WITH_CUDA); the .cu files themselves never see torch headers.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "cuda/kernels.cuh"
#include "ops.h"

namespace bert_fast {

namespace {

void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ", like.device());
}

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

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

at::Tensor ids_i64(const at::Tensor& t) { return t.to(at::kLong).contiguous(); }

at::Tensor bias_residual_layer_norm_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                         double eps, const std::optional<at::Tensor>& linear_bias,
                                         const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "bias_residual_layer_norm";
  c10::cuda::CUDAGuard guard(x.device());
  const bf_dtype_t dt = dtype_code(op, x);
  check_last_dim_contiguous(op, "x", x);
  const int64_t H = x.size(-1);
  check_vector(op, "weight", weight, H);
  check_vector(op, "bias", bias, H);
  check_cuda(op, "weight", weight, x);
  check_cuda(op, "bias", bias, x);
  if (linear_bias) {
    check_vector(op, "linear_bias", *linear_bias, H);
    check_cuda(op, "linear_bias", *linear_bias, x);
  }
  at::Tensor r2;
  const at::Tensor x2 = x.reshape({-1, H});
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual shape ", residual->sizes(), " != x shape ",
                x.sizes());
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), op, ": residual dtype ",
                dtype_name(residual->scalar_type()), " != x dtype ", dtype_name(x.scalar_type()));
    check_cuda(op, "residual", *residual, x);
    check_last_dim_contiguous(op, "residual", *residual);
    r2 = residual->reshape({-1, H});
  }
  const at::Tensor w = param_f32(weight), b = param_f32(bias);
  const at::Tensor lb = linear_bias ? param_f32(*linear_bias) : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  check_status(op, bf_bias_residual_layer_norm(dt, x2.const_data_ptr(), x2.stride(0),
                                               r2.defined() ? r2.const_data_ptr() : nullptr,
                                               r2.defined() ? r2.stride(0) : 0, ptr_or_null<float>(lb),
                                               w.const_data_ptr<float>(), b.const_data_ptr<float>(),
                                               static_cast<float>(eps), y.data_ptr(), x2.size(0), H, stream_of(x)));
  return y;
}

at::Tensor bias_act_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view activation) {
  constexpr const char* op = "bias_act";
  const Activation act = parse_activation(activation);
  c10::cuda::CUDAGuard guard(x.device());
  const bf_dtype_t dt = dtype_code(op, x);
  check_last_dim_contiguous(op, "x", x);
  const int64_t I = x.size(-1);
  if (bias) {
    check_vector(op, "bias", *bias, I);
    check_cuda(op, "bias", *bias, x);
  }
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return y;
  const at::Tensor x2 = x.reshape({-1, I});
  const at::Tensor b = bias ? param_f32(*bias) : at::Tensor();
  check_status(op, bf_bias_act(dt, x2.const_data_ptr(), x2.stride(0), ptr_or_null<float>(b),
                               static_cast<bf_act_t>(static_cast<int>(act)), y.data_ptr(), x2.size(0), I,
                               stream_of(x)));
  return y;
}

at::Tensor embed_layer_norm_cuda(const std::optional<at::Tensor>& input_ids, const at::Tensor& position_ids,
                                 const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb,
                                 const at::Tensor& pos_emb, const at::Tensor& type_emb, const at::Tensor& weight,
                                 const at::Tensor& bias, double eps, const std::optional<at::Tensor>& inputs_embeds) {
  constexpr const char* op = "embed_layer_norm";
  TORCH_CHECK(input_ids.has_value() || inputs_embeds.has_value(), op, ": give input_ids or inputs_embeds");
  c10::cuda::CUDAGuard guard(word_emb.device());
  const bf_dtype_t dt = dtype_code(op, word_emb);
  TORCH_CHECK(word_emb.dim() == 2, op, ": word_emb must be 2-D (vocab, hidden), got shape ", word_emb.sizes());
  const int64_t H = word_emb.size(1);
  for (const at::Tensor* t : {&pos_emb, &type_emb}) {
    TORCH_CHECK(t->dim() == 2 && t->size(1) == H && t->scalar_type() == word_emb.scalar_type(), op,
                ": embedding tables must be (rows, ", H, ") of dtype ", dtype_name(word_emb.scalar_type()), ", got ",
                t->sizes(), " ", dtype_name(t->scalar_type()));
    check_cuda(op, "embedding table", *t, word_emb);
    check_last_dim_contiguous(op, "embedding table", *t);
  }
  check_last_dim_contiguous(op, "word_emb", word_emb);
  check_vector(op, "weight", weight, H);
  check_vector(op, "bias", bias, H);
  const at::Tensor pos = ids_i64(position_ids);
  const at::Tensor ids = (!inputs_embeds && input_ids) ? ids_i64(*input_ids) : at::Tensor();
  const at::Tensor tt = token_type_ids ? ids_i64(*token_type_ids) : at::Tensor();
  at::Tensor emb;
  if (inputs_embeds) {
    TORCH_CHECK(inputs_embeds->scalar_type() == word_emb.scalar_type(), op, ": inputs_embeds dtype ",
                dtype_name(inputs_embeds->scalar_type()), " != embeddings dtype ",
                dtype_name(word_emb.scalar_type()));
    TORCH_CHECK(inputs_embeds->numel() == pos.numel() * H, op, ": inputs_embeds shape ", inputs_embeds->sizes(),
                " does not match position_ids shape ", position_ids.sizes(), " x hidden ", H);
    check_last_dim_contiguous(op, "inputs_embeds", *inputs_embeds);
    emb = inputs_embeds->reshape({-1, H});
  }
  std::vector<int64_t> shape(position_ids.sizes().begin(), position_ids.sizes().end());
  shape.push_back(H);
  at::Tensor y = at::empty(shape, word_emb.options());
  const at::Tensor w = param_f32(weight), b = param_f32(bias);
  check_status(op, bf_embed_layer_norm(dt, ptr_or_null<int64_t>(ids), emb.defined() ? emb.const_data_ptr() : nullptr,
                                       emb.defined() ? emb.stride(0) : 0, pos.const_data_ptr<int64_t>(),
                                       ptr_or_null<int64_t>(tt), word_emb.const_data_ptr(), word_emb.stride(0),
                                       pos_emb.const_data_ptr(), pos_emb.stride(0), type_emb.const_data_ptr(),
                                       type_emb.stride(0), w.const_data_ptr<float>(), b.const_data_ptr<float>(),
                                       static_cast<float>(eps), y.data_ptr(), pos.numel(), H, stream_of(word_emb)));
  return y;
}

at::Tensor gather_rows_cuda(const at::Tensor& x_in, const at::Tensor& indices) {
  constexpr const char* op = "gather_rows";
  c10::cuda::CUDAGuard guard(x_in.device());
  check_index_dtype(op, "indices", indices);
  check_cuda(op, "indices", indices, x_in);
  TORCH_CHECK(x_in.dim() >= 1 && indices.dim() == 1, op, ": expected x with a row dimension and 1-D indices");
  const at::Tensor x = x_in.contiguous(), idx = ids_i64(indices);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = idx.size(0);
  at::Tensor out = at::empty(shape, x.options());
  const int64_t row_bytes = x.size(0) > 0 ? x.nbytes() / x.size(0) : 0;
  check_status(op, bf_gather_rows(x.const_data_ptr(), idx.const_data_ptr<int64_t>(), out.data_ptr(), idx.size(0),
                                  row_bytes, stream_of(x)));
  return out;
}

at::Tensor scatter_rows_cuda(const at::Tensor& x_in, const at::Tensor& indices, int64_t num_rows) {
  constexpr const char* op = "scatter_rows";
  c10::cuda::CUDAGuard guard(x_in.device());
  check_index_dtype(op, "indices", indices);
  check_cuda(op, "indices", indices, x_in);
  TORCH_CHECK(x_in.dim() >= 1 && indices.dim() == 1 && indices.size(0) == x_in.size(0), op,
              ": expected 1-D indices with one entry per row of x, got ", indices.sizes(), " for x ", x_in.sizes());
  TORCH_CHECK(num_rows >= 0, op, ": num_rows must be >= 0, got ", num_rows);
  const at::Tensor x = x_in.contiguous(), idx = ids_i64(indices);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = num_rows;
  at::Tensor out = at::empty(shape, x.options());
  const int64_t row_bytes = num_rows > 0 ? out.nbytes() / num_rows : 0;
  check_status(op, bf_scatter_rows(x.const_data_ptr(), idx.const_data_ptr<int64_t>(), out.data_ptr(), idx.size(0),
                                   num_rows, row_bytes, stream_of(x)));
  return out;
}

// One nonzero and one cumsum, PyTorch's own CUDA kernels (as the torch reference does).
std::tuple<at::Tensor, at::Tensor, at::Tensor> unpad_mask_cuda(const at::Tensor& mask) {
  TORCH_CHECK(mask.dim() == 2, "unpad_mask: expected a (batch, seq_len) mask, got shape ", mask.sizes());
  c10::cuda::CUDAGuard guard(mask.device());
  const at::Tensor valid = mask.ne(0);
  const at::Tensor lens = valid.sum(1, /*keepdim=*/false, at::kInt);
  at::Tensor cu = at::zeros({mask.size(0) + 1}, mask.options().dtype(at::kInt));
  if (mask.size(0) > 0) cu.narrow(0, 1, mask.size(0)).copy_(at::cumsum(lens, 0, at::kInt));
  const at::Tensor indices = at::nonzero(valid.flatten()).flatten();
  const at::Tensor mx = mask.size(0) > 0 ? lens.max() : at::zeros({}, lens.options());
  return {indices, cu, mx};
}

}  // namespace

TORCH_LIBRARY_IMPL(bert_fast, CUDA, m) {
  m.impl("bias_residual_layer_norm", &bias_residual_layer_norm_cuda);
  m.impl("bias_act", &bias_act_cuda);
  m.impl("embed_layer_norm", &embed_layer_norm_cuda);
  m.impl("unpad_mask", &unpad_mask_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
}

}  // namespace bert_fast

#endif  // WITH_CUDA
