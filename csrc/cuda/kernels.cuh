// C launcher API of bert_fast's CUDA kernels.
//
// Plain C types and raw device pointers only, so the .cu files compile with nvcc alone (no torch
// headers, see tests/test_nvcc_compile.py); csrc/cuda/glue.cpp wraps them as torch operators
// after the op's validator (csrc/contracts.h) has run.
// Every launcher enqueues on `stream` (a cudaStream_t) and returns a cudaError_t value (0 = OK):
// the launch error, or cudaErrorInvalidValue for arguments the kernels do not support.
//
// Conventions: activations are rows of `cols` elements with a row stride in elements (last dim
// contiguous); outputs are contiguous; parameters (weight, bias, linear_bias) are fp32 (the glue
// converts them once); index arrays are int64; all arithmetic is fp32.
#pragma once

#include <stdint.h>

#include "../activation.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { BF_FLOAT32 = 0, BF_FLOAT16 = 1, BF_BFLOAT16 = 2 } bf_dtype_t;

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
// Exactly one of input_ids / inputs_embeds is non-null; token_type_ids nullable. *_rows: the
// tables' row counts; a token whose id is outside its table reads nothing and gets a row of NaN
// (the glue range-checks ids on the host first, except under CUDA graph capture).
int bf_embed_layer_norm(bf_dtype_t dtype, const int64_t* input_ids, const void* inputs_embeds, int64_t lde,
                        const int64_t* position_ids, const int64_t* token_type_ids, const void* word_emb,
                        int64_t ldw, int64_t word_rows, const void* pos_emb, int64_t ldp, int64_t pos_rows,
                        const void* type_emb, int64_t ldt, int64_t type_rows, const float* weight, const float* bias,
                        float eps, void* y, int64_t tokens, int64_t hidden, void* stream);

// out[i] = x[indices[i]] for i < n (rows of row_bytes bytes; x (x_rows rows) and out contiguous). An
// index outside [0, x_rows) reads nothing and its output row is filled with 0xff bytes (NaN in the
// float dtypes).
int bf_gather_rows(const void* x, int64_t x_rows, const int64_t* indices, void* out, int64_t n, int64_t row_bytes,
                   void* stream);

// out (num_rows rows) = 0, then out[indices[i]] = x[i] for i < n; an index outside [0, num_rows)
// writes nothing.
int bf_scatter_rows(const void* x, const int64_t* indices, void* out, int64_t n, int64_t num_rows,
                    int64_t row_bytes, void* stream);

#ifdef __cplusplus
}
#endif
