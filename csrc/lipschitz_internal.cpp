// The `lipschitz_internal` op library: host helpers and debug ops, every schema
// in this one place. None is user API (the Python wrappers in lipschitz_ext/ops
// and the tests call them); none takes a floating tensor, so each has one
// CompositeImplicitAutograd kernel, registered next to the code it exposes.
#include <torch/library.h>

TORCH_LIBRARY(lipschitz_internal, m) {
  // Newton-Schulz plans (csrc/ns_plan.cpp): the Python backward of orthogonalize,
  // ns_polynomial and the spectral caps (lipschitz_ext/ops/_recompute.py) reads
  // its coefficients here, so the recompute and the kernels share one table.
  // orthogonalize's plan for these arguments: [norm_scale, then steps (a, b, c) triples]
  m.def("ns_plan(int steps, str coefficients, float[] custom=[]) -> float[]");
  // spectral_hard_cap(method="polynomial")'s quintic steps, same layout (norm_scale 1, unused)
  m.def("hard_cap_polynomial_plan() -> float[]");
  // orthogonalize_gram's restart steps for `steps` steps in compute dtype `compute`
  m.def("gram_ns_restarts(int steps, ScalarType compute) -> int[]");

  // Symmetric Newton-Schulz kernels (csrc/triangle_tiles.cpp): the tile list the
  // kernels decode from their block index, and the backend orthogonalize's
  // backend="default" resolves to now (LIPSCHITZ_NS_BACKEND: 'cublas' or 'symmetric').
  m.def("triangle_tiles(int n, int tile, int batch, bool symmetric=True, int m=-1) -> Tensor");
  m.def("ns_backend() -> str");

  // fp8 attention backward kernels (csrc/fp8_attention_composite.cpp): the kernel
  // backward_kernel="default" resolves to now (LIPSCHITZ_FP8_ATTN_BWD: 'flash',
  // 'cudnn' or 'math'), how many backward calls fell back from cuDNN to
  // FlashAttention-2 so far, and the kernel fp8_attention_bwd runs for a request
  // (its backward_kernel: 'default', 'math', 'flash' or 'cudnn') on a device ('math', 'flash' or 'cudnn').
  m.def("fp8_attention_bwd_setting() -> str");
  m.def("fp8_attention_bwd_cudnn_fallbacks() -> int");
  m.def(
      "fp8_attention_bwd_path(str backward_kernel, int compute_major, int cudnn_version, bool cudnn_sdp_enabled=True, "
      "bool empty=False) -> str");
}
