// CPU kernels of the spectral caps (soft cap, hard cap, orthogonal projection,
// exact SVD clip): float32 compute (float64 for float64 input), BLAS batched
// GEMMs; math in csrc/spectral_cap.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "spectral_cap.h"

namespace lipschitz {
namespace {

at::Tensor spectral_soft_cap_cpu(const at::Tensor& W, double alpha) {
  return soft_cap_impl(aten_backend(), W, alpha);
}

at::Tensor spectral_soft_cap_per_matrix_cpu(const at::Tensor& W, const at::Tensor& alpha) {
  return soft_cap_per_matrix_impl(aten_backend(), W, alpha);
}

at::Tensor spectral_hard_cap_cpu(const at::Tensor& W, double sigma_max, c10::string_view method,
                                 int64_t steps, int64_t iters) {
  return hard_cap_impl(aten_backend(), W, sigma_max, method, steps, iters);
}

std::tuple<at::Tensor, at::Tensor> spectral_hard_cap_eigh_certified_cpu(const at::Tensor& W, double sigma_max,
                                                                         double slack) {
  return hard_cap_eigh_certified_impl(aten_backend(), W, sigma_max, slack);
}

at::Tensor orthogonal_project_cpu(const at::Tensor& W, double sigma_max, int64_t steps) {
  return orthogonal_project_impl(aten_backend(), W, sigma_max, steps);
}

at::Tensor svd_cap_cpu(const at::Tensor& W, double sigma_max) { return svd_cap_impl(W, sigma_max); }

}  // namespace

TORCH_LIBRARY_IMPL(lipschitz, CPU, m) {
  m.impl("spectral_soft_cap", &spectral_soft_cap_cpu);
  m.impl("spectral_soft_cap.per_matrix", &spectral_soft_cap_per_matrix_cpu);
  m.impl("_spectral_hard_cap", &spectral_hard_cap_cpu);
  m.impl("_spectral_hard_cap_eigh_certified", &spectral_hard_cap_eigh_certified_cpu);
  m.impl("orthogonal_project", &orthogonal_project_cpu);
  m.impl("svd_cap", &svd_cap_cpu);
}

}  // namespace lipschitz
