// C launcher API of bert_fast's CUDA kernels.
//
// Plain C types and raw device pointers only, so the .cu files compile with nvcc alone (no torch
// headers, see tests/test_nvcc_compile.py); csrc/cuda_ops.cpp wraps them as torch operators.
// Every launcher enqueues on `stream` (a cudaStream_t) and returns a cudaError_t value (0 = OK):
// the launch error, or cudaErrorInvalidValue for arguments the kernels do not support.
//
// Conventions: activations are rows of `cols` elements with a row stride in elements (last dim
// contiguous); outputs are contiguous; parameters (weight, bias, linear_bias) are fp32 (the glue
// converts them once); index arrays are int64; all arithmetic is fp32.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { BF_FLOAT32 = 0, BF_FLOAT16 = 1, BF_BFLOAT16 = 2 } bf_dtype_t;
typedef enum { BF_ACT_GELU = 0, BF_ACT_GELU_TANH = 1, BF_ACT_RELU = 2 } bf_act_t;

// y = LayerNorm(x + linear_bias + residual) * weight + bias, per row of `hidden` elements.
// residual, linear_bias: nullable. Statistics in fp32, eps as given.
int bf_bias_residual_layer_norm(bf_dtype_t dtype, const void* x, int64_t ldx, const void* residual, int64_t ldr,
                                const float* linear_bias, const float* weight, const float* bias, float eps,
                                void* y, int64_t rows, int64_t hidden, void* stream);

// y = act(x + bias); bias nullable.
int bf_bias_act(bf_dtype_t dtype, const void* x, int64_t ldx, const float* bias, bf_act_t act, void* y,
                int64_t rows, int64_t cols, void* stream);

// y[t] = LayerNorm((word[input_ids[t]] or inputs_embeds[t]) + type[token_type_ids[t] or 0]
//                  + pos[position_ids[t]]) * weight + bias.
// Exactly one of input_ids / inputs_embeds is non-null; token_type_ids nullable. Ids are not
// range-checked on the device (the caller validates them).
int bf_embed_layer_norm(bf_dtype_t dtype, const int64_t* input_ids, const void* inputs_embeds, int64_t lde,
                        const int64_t* position_ids, const int64_t* token_type_ids, const void* word_emb,
                        int64_t ldw, const void* pos_emb, int64_t ldp, const void* type_emb, int64_t ldt,
                        const float* weight, const float* bias, float eps, void* y, int64_t tokens, int64_t hidden,
                        void* stream);

// out[i] = x[indices[i]] for i < n (rows of row_bytes bytes; x and out contiguous).
int bf_gather_rows(const void* x, const int64_t* indices, void* out, int64_t n, int64_t row_bytes, void* stream);

// out (num_rows rows) = 0, then out[indices[i]] = x[i] for i < n.
int bf_scatter_rows(const void* x, const int64_t* indices, void* out, int64_t n, int64_t num_rows,
                    int64_t row_bytes, void* stream);

#ifdef __cplusplus
}
#endif
