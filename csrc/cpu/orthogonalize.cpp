// CPU kernel of lipschitz::orthogonalize: computes in float32 (float64 for
// float64 input), returns the input's dtype and shape.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "newton_schulz.h"
#include "ns_coefficients.h"

namespace lipschitz {

at::Tensor orthogonalize_cpu(const at::Tensor& G, int64_t steps, c10::string_view coefficients,
                             at::ArrayRef<double> custom, double eps) {
  check_matrix_batch(G, "orthogonalize", "G");
  check_nonnegative(eps, "orthogonalize", "eps");
  const NSPlan plan = make_ns_plan(steps, coefficients, custom, "orthogonalize");
  if (G.numel() == 0) return at::empty(G.sizes(), G.options());

  const auto compute = G.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor X = as_batch3d(G).to(compute);
  // Per-matrix Frobenius norm accumulated in float64 so huge finite entries
  // cannot overflow to inf (which would silently zero the output).
  at::Tensor norm = at::linalg_vector_norm(X, 2, at::IntArrayRef{-2, -1}, /*keepdim=*/true,
                                           at::kDouble);
  // a zero matrix maps to zero even with eps = 0 (not 0 / 0)
  const at::Tensor denom = norm * plan.norm_scale + eps;
  X = (X.to(at::kDouble) / at::where(denom == 0, at::ones_like(denom), denom)).to(compute);
  X = newton_schulz_steps(X, plan);
  return X.reshape(G.sizes()).to(G.scalar_type()).contiguous();
}

at::Tensor ns_polynomial_cpu(const at::Tensor& s, int64_t steps, c10::string_view coefficients,
                             at::ArrayRef<double> custom) {
  TORCH_CHECK(at::isFloatingType(s.scalar_type()), "ns_polynomial: argument 's' must be a ",
              "floating-point tensor, got ", s.scalar_type());
  const NSPlan plan = make_ns_plan(steps, coefficients, custom, "ns_polynomial");
  at::Tensor x = s.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
  for (const auto& abc : plan.coeffs) {
    const at::Tensor x2 = x * x;
    x = x * (abc[0] + x2 * (abc[1] + x2 * abc[2]));
  }
  return x.to(s.scalar_type()).contiguous();
}

TORCH_LIBRARY_IMPL(lipschitz, CPU, m) {
  m.impl("orthogonalize", &orthogonalize_cpu);
  m.impl("ns_polynomial", &ns_polynomial_cpu);
}

}  // namespace lipschitz
