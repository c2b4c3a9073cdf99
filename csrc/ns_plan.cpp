// The resolved Newton-Schulz plans the kernels run, as host-side ops
// (lipschitz_internal::ns_plan, ...; schemas in csrc/lipschitz_internal.cpp): the
// Python backward of orthogonalize, ns_polynomial and the spectral caps
// (lipschitz_ext/ops/_recompute.py) reads its coefficients here, so the
// differentiable recompute and the kernels share one table (csrc/ns_coefficients.h).
// No op takes a tensor: one kernel for every device, called once at import.
#include <vector>

#include <torch/library.h>

#include "newton_schulz.h"
#include "ns_coefficients.h"
#include "spectral_cap.h"

namespace lipschitz {
namespace {

// [norm_scale, a_1, b_1, c_1, ..., a_steps, b_steps, c_steps]
std::vector<double> flatten(const NSPlan& plan) {
  std::vector<double> out{plan.norm_scale};
  for (const auto& abc : plan.coeffs) out.insert(out.end(), abc.begin(), abc.end());
  return out;
}

std::vector<double> ns_plan(int64_t steps, c10::string_view coefficients, at::ArrayRef<double> custom) {
  return flatten(make_ns_plan(steps, coefficients, custom, "ns_plan"));
}

std::vector<double> hard_cap_polynomial_ns_plan() { return flatten(hard_cap_polynomial_plan()); }

// the steps (0-based) before which gram_newton_schulz_steps restarts, in `compute`
std::vector<int64_t> gram_ns_restarts(int64_t steps, at::ScalarType compute) {
  std::vector<int64_t> out;
  for (int64_t i = 0; i < steps; ++i)
    if (gram_ns_restart_before(i, steps, compute)) out.push_back(i);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lipschitz_internal, CompositeImplicitAutograd, m) {
  m.impl("ns_plan", &ns_plan);
  m.impl("hard_cap_polynomial_plan", &hard_cap_polynomial_ns_plan);
  m.impl("gram_ns_restarts", &gram_ns_restarts);
}

}  // namespace lipschitz
