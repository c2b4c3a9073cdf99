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

// Gram Newton-Schulz: the same steps, iterated on the small Gram matrix R = X X^T
// (X^T X for tall X, k = min(m, n)). Every step's polynomial is P = a I + b R + c R^2,
// so X_i = Q X_0 with Q = P_1 ... P_i and R_i = P R P: all GEMMs but the restarts
// and the final Q X are k x k. A restart (X <- Q X, R <- X X^T, Q <- I) bounds the
// rounding that R accumulates; where they go (docs/kernels.md, "Gram Newton-Schulz"):
// in float32 and float64 before steps 2, 5, 8, ... (the first Gram matrix serves the
// two steps that stretch the spectrum the most, then at most three steps per Gram
// matrix); in bf16 / fp16 before every step from 1 up to steps - 2 (the last two steps
// share one): a bf16 Gram matrix misplaces eigenvalues below ~4e-3 of its largest, and
// carried through P R P into a second step that error grows past the polynomials' range.
// Restarts counted: 4 k^2 l + 14 k^3 multiply-adds for five float32 steps
// (l = max(m, n)) against 10 k^2 l + 5 k^3 for the standard iteration.
inline bool gram_ns_restart_before(int64_t step, int64_t steps, at::ScalarType compute) {
  if (compute == at::kBFloat16 || compute == at::kHalf) return step >= 1 && step <= steps - 2;
  return step >= 2 && (step - 2) % 3 == 0;
}

// R0: X0's small-side Gram matrix when the caller already has it (it is not formed again),
// or undefined. restart = false: no restarts at all, for polynomials that never multiply
// small singular values by much (the hard cap's quintic: a <= 1.81 per step), whose R
// carries no more rounding than the standard iteration's (docs/kernels.md).
inline at::Tensor gram_newton_schulz_steps_from(const at::Tensor& X0, const NSPlan& plan,
                                                const at::Tensor& R0, bool restart = true) {
  const bool tall = X0.size(-2) > X0.size(-1);
  const auto compute = X0.scalar_type();
  const auto steps = static_cast<int64_t>(plan.coeffs.size());
  at::Tensor X = tall ? X0.mT() : X0;  // [B, k, l], k <= l: a view, no copy
  at::Tensor R = R0.defined() ? R0 : at::bmm(X, X.mT());
  at::Tensor Q;  // undefined: the identity
  for (int64_t i = 0; i < steps; ++i) {
    if (restart && gram_ns_restart_before(i, steps, compute)) {
      X = at::bmm(Q, X);
      R = at::bmm(X, X.mT());
      Q = at::Tensor();
    }
    const auto& abc = plan.coeffs[static_cast<size_t>(i)];
    at::Tensor P = at::baddbmm(R, R, R, /*beta=*/abc[1], /*alpha=*/abc[2]);
    P.diagonal(0, -2, -1).add_(abc[0]);
    Q = Q.defined() ? at::bmm(Q, P) : P;
    if (i + 1 < steps && !(restart && gram_ns_restart_before(i + 1, steps, compute)))
      R = at::bmm(P, at::bmm(R, P));
  }
  X = at::bmm(Q, X);
  return tall ? X.mT() : X;
}

inline at::Tensor gram_newton_schulz_steps(const at::Tensor& X0, const NSPlan& plan) {
  return gram_newton_schulz_steps_from(X0, plan, at::Tensor());
}

}  // namespace lipschitz
