// The Newton-Schulz iteration on an already normalized batch X [B, m, n].
// Shared by the CPU and CUDA kernels: each step is three batched GEMMs with
// fused epilogues (B = b A + c A A and X = a X + B X via baddbmm's beta/alpha),
// dispatched to BLAS / cuBLAS (bf16 inputs accumulate in fp32 on CUDA).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "ns_coefficients.h"

namespace lipschitz {

// The dtype the Newton-Schulz GEMMs run in: `requested` when given (bfloat16,
// float32 or float64; bf16 GEMMs accumulate in fp32), else the device default
// `fallback` (float64 input stays float64).
inline at::ScalarType ns_compute_dtype(at::ScalarType input, std::optional<at::ScalarType> requested,
                                       at::ScalarType fallback) {
  if (!requested.has_value()) return input == at::kDouble ? at::kDouble : fallback;
  const at::ScalarType t = *requested;
  TORCH_CHECK(t == at::kBFloat16 || t == at::kFloat || t == at::kDouble,
              "orthogonalize: argument 'compute_dtype' must be bfloat16, float32 or float64 "
              "(or None for the device default), got ", t);
  return t;
}

// Works in the wide orientation without copying: for a tall X (m > n) the
// Gram matrix is X^T X (n x n) and the update is X (a I + B).
inline at::Tensor newton_schulz_steps(at::Tensor X, const NSPlan& plan) {
  const bool tall = X.size(-2) > X.size(-1);
  for (const auto& abc : plan.coeffs) {
    const double a = abc[0], b = abc[1], c = abc[2];
    at::Tensor A = tall ? at::bmm(X.mT(), X) : at::bmm(X, X.mT());
    at::Tensor B = at::baddbmm(A, A, A, /*beta=*/b, /*alpha=*/c);
    X = tall ? at::baddbmm(X, X, B, /*beta=*/a, /*alpha=*/1.0)
             : at::baddbmm(X, B, X, /*beta=*/a, /*alpha=*/1.0);
  }
  return X;
}

}  // namespace lipschitz
