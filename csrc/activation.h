/* Activation codes of bias_act, defined once for the CPU kernels, the CUDA kernels (plain C: the
 * .cu files include no torch headers) and the glue. The Python side (kernels/activation.py) maps
 * the names to the same integers for its Triton kernel: gelu = 0, gelu_tanh = 1, relu = 2.
 * Never renumber: the integers are part of the contract with Python. */
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  BF_ACT_GELU = 0,      /* exact GELU, 0.5 x (1 + erf(x / sqrt 2)) (HF "gelu") */
  BF_ACT_GELU_TANH = 1, /* tanh approximation (HF "gelu_new", "gelu_pytorch_tanh") */
  BF_ACT_RELU = 2
} bf_act_t;

#ifdef __cplusplus
}
#endif
