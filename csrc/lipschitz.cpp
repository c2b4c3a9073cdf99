// The `lipschitz` op library: every op's schema, in one place. One op family =
// five places with one name X: the schema here, the CPU kernel csrc/cpu/X.cpp,
// the CUDA kernel csrc/cuda/X.cu (the shared pipeline in csrc/X.h), the Python
// wrapper + fake (meta) kernel lipschitz_ext/ops/X.py, and python_tests/test_X.py.
// The spectral caps are X = spectral_cap; the composite fp8_attention op is
// csrc/fp8_attention_composite.cpp.
// A large CUDA kernel may span csrc/cuda/X_*.cu by role (fp8_attention). Host helpers
// and debug ops (no user API) are the `lipschitz_internal` library, whose schemas
// are all in csrc/lipschitz_internal.cpp.
#include <Python.h>
#include <torch/library.h>

// An empty Python module: importing lipschitz_ext._C loads this shared library,
// which runs the static TORCH_LIBRARY registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "lipschitz_ext C++/CUDA ops (torch.ops.lipschitz)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(lipschitz, m) {
  // Muon's msign by Newton-Schulz; see csrc/cpu/orthogonalize.cpp. `backend` picks
  // the CUDA kernels: "cublas" (batched GEMMs), "symmetric" (csrc/ns_symmetric.h) or
  // "default" (LIPSCHITZ_NS_BACKEND, else "cublas"); the CPU takes "default" only.
  m.def(
      "orthogonalize(Tensor G, int steps=5, str coefficients=\"polar_express\", "
      "float[] custom=[], float eps=1e-07, ScalarType? compute_dtype=None, "
      "str backend=\"default\") -> Tensor");
  // The same map by Gram Newton-Schulz (the steps on the small Gram matrix, with
  // restarts); see gram_newton_schulz_steps in csrc/newton_schulz.h.
  m.def(
      "orthogonalize_gram(Tensor G, int steps=5, str coefficients=\"polar_express\", "
      "float[] custom=[], float eps=1e-07, ScalarType? compute_dtype=None) -> Tensor");
  // The composite scalar polynomial of those steps, elementwise (no
  // normalization): s -> p(s). For update-norm bounds (p_max) and tests.
  m.def(
      "ns_polynomial(Tensor s, int steps=5, str coefficients=\"polar_express\", "
      "float[] custom=[]) -> Tensor");

  // Top singular triplet by batched power iteration; see csrc/power_iteration.h.
  // sigma [...], u [..., m], v [..., n] in float32 (float64 for float64 W).
  m.def("power_iteration(Tensor W, int iters=16, Tensor? u=None) -> (Tensor sigma, Tensor u, Tensor v)");
  // Rank-1 constraints on the power-iteration triplet; return (new W, u for a warm start).
  m.def(
      "spectral_normalize(Tensor W, float sigma_max=1.0, int iters=16, Tensor? u=None) "
      "-> (Tensor out, Tensor u)");
  m.def(
      "spectral_hammer(Tensor W, float sigma_max=1.0, int iters=16, Tensor? u=None) "
      "-> (Tensor out, Tensor u)");
  m.def(
      "spectral_weight_decay(Tensor W, float lam, int iters=16, Tensor? u=None) "
      "-> (Tensor out, Tensor u)");
  // Spectral caps; see csrc/spectral_cap.h.
  m.def("spectral_soft_cap(Tensor W, float alpha) -> Tensor");
  m.def("spectral_soft_cap.per_matrix(Tensor W, Tensor alpha) -> Tensor");
  // The hard cap's kernel without its certification: private (leading underscore). Its
  // guarantee (every output singular value certified <= sigma_max (1 + slack)) is the
  // Python wrapper's (lipschitz_ext.ops.spectral_hard_cap: the certified pre-scale and
  // output guard), the one public door.
  m.def(
      "_spectral_hard_cap(Tensor W, float sigma_max=1.0, str method=\"msign\", int steps=10, "
      "int iters=16) -> Tensor");
  // The eigh cap with its own certificate (float32 on CPU; csrc/spectral_cap.h): returns
  // (out, certified [...]), certified = out's every singular value proven < sigma_max (1 + slack).
  // Private: the wrapper guards the matrices it leaves uncertified.
  m.def(
      "_spectral_hard_cap_eigh_certified(Tensor W, float sigma_max=1.0, float slack=0.001) "
      "-> (Tensor out, Tensor certified)");
  m.def("orthogonal_project(Tensor W, float sigma_max=1.0, int steps=10) -> Tensor");
  m.def("svd_cap(Tensor W, float sigma_max=1.0) -> Tensor");

  // fp8 (e4m3) attention forward with static scales, bf16 [B, H, N, d] in (or
  // float8_e4m3fn already quantized with those scales) and bf16 out; see
  // csrc/fp8_attention.h for the exact rounding it performs. The
  // composite op calls fp8_attention_fwd, which carries the autograd formula
  // (registered in lipschitz_ext/ops/fp8_attention.py). `backward` picks the
  // gradient's statistics: "exact" (recomputed) or "saved" (the forward's);
  // `backward_kernel` the kernel that computes it (see fp8_attention_bwd).
  m.def(
      "fp8_attention(Tensor q, Tensor k, Tensor v, bool causal=True, float? softmax_scale=None, "
      "float q_scale=1.0, float k_scale=1.0, float v_scale=1.0, str backward=\"exact\", "
      "str backward_kernel=\"default\") -> Tensor");
  // Returns (out bf16 [B, H, N, d], lse float32 [B, H, N], natural log).
  m.def(
      "fp8_attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale, "
      "float q_scale, float k_scale, float v_scale, str backward=\"exact\", "
      "str backward_kernel=\"default\") -> (Tensor, Tensor)");
  // bf16 gradient of softmax attention at bf16 (q, k, v), straight-through for the
  // fp8 quantization. Without (out, lse): exact attention's gradient. With them:
  // FlashAttention's formulas fed with those statistics. -> (dq, dk, dv). `kernel`:
  // "math" (ATen, float32), "flash" (PyTorch's FlashAttention-2), "cudnn" (cuDNN's
  // SDPA backward, FlashAttention-2 where unavailable) or "default"
  // (LIPSCHITZ_FP8_ATTN_BWD, else "flash"); the CPU takes "default" and "math".
  m.def(
      "fp8_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? out, Tensor? lse, "
      "bool causal, float softmax_scale, str kernel=\"default\") -> (Tensor, Tensor, Tensor)");
}
