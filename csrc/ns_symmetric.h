// The Newton-Schulz backend of the CUDA orthogonalize kernel (its `backend`
// argument), and the entry point of the symmetric, copy-free kernels
// (csrc/cuda/ns_symmetric.cu).
//   backend="cublas"     (the reference) three batched cuBLAS GEMMs per step
//                        (csrc/newton_schulz.h)
//   backend="symmetric"  upper-triangle tiles + mirrored store for X X^T and
//                        b A + c A A, X' = a X + B X into a second buffer,
//                        normalization folded into the first step (bf16 tensor
//                        cores, fp32 accumulation; bf16 compute only)
//   backend="default"    the environment variable LIPSCHITZ_NS_BACKEND ('cublas'
//                        or 'symmetric'), read at every call; 'cublas' when unset.
//                        Under 'symmetric', a compute dtype other than bf16 runs
//                        the cuBLAS steps.
// The CPU kernel implements the ATen steps only and takes backend="default".
#pragma once

#include <cstdlib>
#include <optional>
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

// The `backend` argument of orthogonalize, checked on every device: nullopt for
// "default" (the device's default), else the named CUDA backend.
inline std::optional<NSBackend> parse_ns_backend_arg(c10::string_view backend, const char* op) {
  if (backend == "default") return std::nullopt;
  if (backend == "cublas") return NSBackend::kCublas;
  if (backend == "symmetric") return NSBackend::kSymmetric;
  TORCH_CHECK(false, op, ": argument 'backend' must be 'default', 'cublas' or 'symmetric', got '",
              std::string(backend), "'");
}

#ifdef LIPSCHITZ_WITH_CUDA
// orthogonalize of a CUDA G (any floating dtype but float64; checks already done,
// G.numel() > 0) with the symmetric kernels; returns G's shape and dtype.
at::Tensor orthogonalize_symmetric_cuda(const at::Tensor& G, const NSPlan& plan, double eps);
#endif

}  // namespace lipschitz
