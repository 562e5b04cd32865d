// bert_fast._C: operator schemas (TORCH_LIBRARY), the registration of every implementation (CPU
// always, CUDA in a WITH_CUDA build: the same ops, tests/test_nvcc_compile.py checks both lists
// match), and the Python module. Fake (meta) implementations for torch.compile live on the Python
// side (bert_fast.kernels). Keep the schemas as they are: the Python side calls them by name.
#include <Python.h>

#include <torch/library.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

#include "ops.h"

namespace bert_fast {

TORCH_LIBRARY(bert_fast, m) {
  m.def(
      "bias_residual_layer_norm(Tensor x, Tensor weight, Tensor bias, float eps, Tensor? linear_bias=None, "
      "Tensor? residual=None) -> Tensor");
  m.def("bias_act(Tensor x, Tensor? bias, str activation) -> Tensor");
  m.def(
      "embed_layer_norm(Tensor? input_ids, Tensor position_ids, Tensor? token_type_ids, Tensor word_emb, "
      "Tensor pos_emb, Tensor type_emb, Tensor weight, Tensor bias, float eps, Tensor? inputs_embeds=None) -> Tensor");
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale) -> Tensor");
  // max_seqlen comes back as a 0-d int32 tensor (an op cannot return a data-dependent int); the
  // Python wrapper turns it into a Python int.
  m.def("unpad_mask(Tensor mask) -> (Tensor indices, Tensor cu_seqlens, Tensor max_seqlen)");
  m.def("gather_rows(Tensor x, Tensor indices) -> Tensor");
  m.def("scatter_rows(Tensor x, Tensor indices, SymInt num_rows) -> Tensor");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  // Backward ops (CPU only; registered below, outside the two-device list).
  m.def("bias_act_bwd(Tensor grad, Tensor x, Tensor? bias, str activation) -> (Tensor dx, Tensor dbias)");
  m.def(
      "bias_residual_layer_norm_bwd(Tensor grad, Tensor x, Tensor weight, Tensor bias, float eps, "
      "Tensor? linear_bias=None, Tensor? residual=None) -> (Tensor dx, Tensor dweight, Tensor dbias, "
      "Tensor dlinear_bias)");
  // inputs_embeds given: dword_emb is a (0, H) placeholder; not given: dinputs_embeds is one.
  m.def(
      "embed_layer_norm_bwd(Tensor grad, Tensor? input_ids, Tensor position_ids, Tensor? token_type_ids, "
      "Tensor word_emb, Tensor pos_emb, Tensor type_emb, Tensor weight, Tensor bias, float eps, "
      "Tensor? inputs_embeds=None) -> (Tensor dword_emb, Tensor dpos_emb, Tensor dtype_emb, Tensor dweight, "
      "Tensor dbias, Tensor dinputs_embeds)");
  m.def(
      "varlen_attention_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, "
      "float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Small-batch fp32 GEMM on packed weights (CPU only; registered below, outside the two-device list).
  // sgemm_available takes no tensor, so it has one kernel for every dispatch key.
  m.def("sgemm_available() -> bool", &sgemm_available_cpu);
  m.def("sgemm_pack(Tensor weight) -> Tensor");
  m.def("sgemm_packed_linear(Tensor x, Tensor packed, int n, int k, Tensor? bias=None) -> Tensor");
}

// Every op, registered with its <op>_<device> implementation (ops.h): one list for both devices, so
// an op cannot be registered for one and forgotten for the other.
#define BERT_FAST_REGISTER_OPS(DEV)                                     \
  m.impl("bias_residual_layer_norm", &bias_residual_layer_norm_##DEV); \
  m.impl("bias_act", &bias_act_##DEV);                                 \
  m.impl("embed_layer_norm", &embed_layer_norm_##DEV);                 \
  m.impl("varlen_attention", &varlen_attention_##DEV);                 \
  m.impl("unpad_mask", &unpad_mask_##DEV);                             \
  m.impl("gather_rows", &gather_rows_##DEV);                           \
  m.impl("scatter_rows", &scatter_rows_##DEV);                         \
  m.impl("linear", &linear_##DEV);

TORCH_LIBRARY_IMPL(bert_fast, CPU, m) { BERT_FAST_REGISTER_OPS(cpu) }

TORCH_LIBRARY_IMPL(bert_fast, CPU, m) {
  m.impl("bias_act_bwd", &bias_act_bwd_cpu);
  m.impl("bias_residual_layer_norm_bwd", &bias_residual_layer_norm_bwd_cpu);
  m.impl("embed_layer_norm_bwd", &embed_layer_norm_bwd_cpu);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cpu);
  m.impl("sgemm_pack", &sgemm_pack_cpu);
  m.impl("sgemm_packed_linear", &sgemm_packed_linear_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(bert_fast, CUDA, m) { BERT_FAST_REGISTER_OPS(cuda) }
#endif

#undef BERT_FAST_REGISTER_OPS

}  // namespace bert_fast

namespace {

// The CPU kernels are compiled for the instruction set setup.py chose (see BERT_FAST_CPU_ISA);
// refuse to load on a CPU without it rather than die later of an illegal instruction. The
// package then falls back to the torch backend.
const char* missing_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
#if defined(__AVX512BW__)
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512dq"))
    return "AVX-512 (F, BW, VL, DQ)";
#endif
#if defined(__AVX2__)
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return "AVX2 and FMA";
#endif
#endif
  return nullptr;
}

struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                 "bert_fast's C++/CUDA kernels, registered as torch.ops.bert_fast.*", -1, nullptr};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  if (const char* isa = missing_isa()) {
    PyErr_Format(PyExc_ImportError, "bert_fast._C was compiled for %s, which this CPU does not support", isa);
    return nullptr;
  }
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyModule_AddObject(mod, "WITH_CUDA", Py_NewRef(Py_True));
#else
  PyModule_AddObject(mod, "WITH_CUDA", Py_NewRef(Py_False));
#endif
#if defined(__AVX512BW__)
  PyModule_AddStringConstant(mod, "CPU_ISA", "avx512");
#elif defined(__AVX2__)
  PyModule_AddStringConstant(mod, "CPU_ISA", "avx2");
#else
  PyModule_AddStringConstant(mod, "CPU_ISA", "generic");
#endif
  return mod;
}
