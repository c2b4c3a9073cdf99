// The Newton-Schulz backend switch of the CUDA orthogonalize kernel, and the
// entry point of the symmetric, copy-free kernels (csrc/cuda/ns_symmetric.cu).
//   LIPSCHITZ_NS_BACKEND=cublas     (default, and the reference) three batched
//                                   cuBLAS GEMMs per step (csrc/newton_schulz.h)
//   LIPSCHITZ_NS_BACKEND=symmetric  upper-triangle tiles + mirrored store for
//                                   X X^T and b A + c A A, X' = a X + B X into a
//                                   second buffer, normalization folded into the
//                                   first step (bf16 tensor cores, fp32 accumulation)
// The variable is read at every call, so a process can compare both paths.
#pragma once

#include <cstdlib>
#include <string>
#include <string_view>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "ns_coefficients.h"

namespace lipschitz {

enum class NSBackend { kCublas, kSymmetric };

inline const char* ns_backend_name(NSBackend b) {
  return b == NSBackend::kSymmetric ? "symmetric" : "cublas";
}

// Unset or empty -> cublas; anything but the two names is refused (a typo must
// not silently benchmark the wrong path).
inline NSBackend parse_ns_backend(const char* value) {
  if (value == nullptr || *value == '\0') return NSBackend::kCublas;
  const std::string_view v(value);
  if (v == "cublas") return NSBackend::kCublas;
  if (v == "symmetric") return NSBackend::kSymmetric;
  TORCH_CHECK(false, "environment variable LIPSCHITZ_NS_BACKEND must be 'cublas' or 'symmetric', got '",
              std::string(v), "'");
}

inline NSBackend ns_backend_from_env() { return parse_ns_backend(std::getenv("LIPSCHITZ_NS_BACKEND")); }

#ifdef LIPSCHITZ_WITH_CUDA
// orthogonalize of a CUDA G (any floating dtype but float64; checks already done,
// G.numel() > 0) with the symmetric kernels; returns G's shape and dtype.
at::Tensor orthogonalize_symmetric_cuda(const at::Tensor& G, const NSPlan& plan, double eps);
#endif

}  // namespace lipschitz
