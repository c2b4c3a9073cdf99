// CPU kernel of lipschitz::orthogonalize: computes in compute_dtype (default
// float32; float64 for float64 input), returns the input's dtype and shape.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "newton_schulz.h"
#include "ns_coefficients.h"
#include "ns_symmetric.h"

namespace lipschitz {

namespace {

// Both algorithms: checks, normalization G / (||G||_F * norm_scale + eps) in the
// compute dtype, `iterate` (standard or Gram Newton-Schulz), G's shape and dtype back.
template <typename Iterate>
at::Tensor orthogonalize_with(const char* op, const at::Tensor& G, int64_t steps,
                              c10::string_view coefficients, at::ArrayRef<double> custom, double eps,
                              std::optional<at::ScalarType> compute_dtype, Iterate iterate) {
  const NoAutocast no_autocast;
  check_matrix_batch(G, op, "G");
  check_nonnegative(eps, op, "eps");
  const NSPlan plan = make_ns_plan(steps, coefficients, custom, op);
  // default float32 (float64 stays float64); bf16 GEMMs (oneDNN) accumulate in fp32
  const auto compute = ns_compute_dtype(G.scalar_type(), compute_dtype, at::kFloat);
  if (G.numel() == 0) return at::empty(G.sizes(), G.options());

  const at::Tensor G3 = as_batch3d(G);
  // Per-matrix Frobenius norm accumulated in float64 so huge finite entries
  // cannot overflow to inf (which would silently zero the output).
  const at::Tensor norm = at::linalg_vector_norm(G3, 2, at::IntArrayRef{-2, -1}, /*keepdim=*/true,
                                                 at::kDouble);
  const at::Tensor denom = norm * plan.norm_scale + eps;
  // 1 / denom, and 0 for a zero matrix: it maps to zero even with eps = 0 (not 0 / 0)
  const at::Tensor inv = at::where(denom == 0, at::zeros_like(denom), denom.reciprocal());
  at::Tensor X;
  // One vectorized float32 multiply where every 1/denom is a normal float32 (a
  // mixed float64 multiply is ~50x slower on CPU); float64 otherwise (norms > 1e30, NaN).
  if (compute != at::kDouble && G.scalar_type() != at::kDouble &&
      denom.max().item<double>() < 1e30) {
    X = (G3.to(at::kFloat) * inv.to(at::kFloat)).to(compute);
  } else {
    X = (G3.to(at::kDouble) * inv).to(compute);
  }
  X = iterate(X, plan);
  return X.reshape(G.sizes()).to(G.scalar_type()).contiguous();
}

}  // namespace

at::Tensor orthogonalize_cpu(const at::Tensor& G, int64_t steps, c10::string_view coefficients,
                             at::ArrayRef<double> custom, double eps,
                             std::optional<at::ScalarType> compute_dtype, c10::string_view backend) {
  TORCH_CHECK(!parse_ns_backend_arg(backend, "orthogonalize").has_value(),
              "orthogonalize: argument 'backend' must be 'default' on CPU (the ATen steps); '",
              std::string(backend), "' is a CUDA kernel");
  return orthogonalize_with("orthogonalize", G, steps, coefficients, custom, eps, compute_dtype,
                            &newton_schulz_steps);
}

at::Tensor orthogonalize_gram_cpu(const at::Tensor& G, int64_t steps, c10::string_view coefficients,
                                  at::ArrayRef<double> custom, double eps,
                                  std::optional<at::ScalarType> compute_dtype) {
  return orthogonalize_with("orthogonalize_gram", G, steps, coefficients, custom, eps, compute_dtype,
                            &gram_newton_schulz_steps);
}

at::Tensor ns_polynomial_cpu(const at::Tensor& s, int64_t steps, c10::string_view coefficients,
                             at::ArrayRef<double> custom) {
  const NoAutocast no_autocast;
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
  m.impl("orthogonalize_gram", &orthogonalize_gram_cpu);
  m.impl("ns_polynomial", &ns_polynomial_cpu);
}

}  // namespace lipschitz
