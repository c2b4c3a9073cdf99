// CPU kernels of lipschitz::power_iteration and the rank-1 constraints built on
// it (spectral_normalize, spectral_hammer, spectral_weight_decay): float32
// compute (float64 for float64 input); math in csrc/power_iteration.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "power_iteration.h"

namespace lipschitz {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_cpu(
    const at::Tensor& W, int64_t iters, const std::optional<at::Tensor>& u) {
  return power_iteration_impl(W, iters, u);
}

std::tuple<at::Tensor, at::Tensor> spectral_normalize_cpu(const at::Tensor& W, double sigma_max,
                                                          int64_t iters,
                                                          const std::optional<at::Tensor>& u) {
  return rank1_impl(aten_backend(), Rank1Kind::kNormalize, "spectral_normalize", W, sigma_max,
                    iters, u);
}

std::tuple<at::Tensor, at::Tensor> spectral_hammer_cpu(const at::Tensor& W, double sigma_max,
                                                       int64_t iters,
                                                       const std::optional<at::Tensor>& u) {
  return rank1_impl(aten_backend(), Rank1Kind::kHammer, "spectral_hammer", W, sigma_max, iters, u);
}

std::tuple<at::Tensor, at::Tensor> spectral_weight_decay_cpu(const at::Tensor& W, double lam,
                                                             int64_t iters,
                                                             const std::optional<at::Tensor>& u) {
  return rank1_impl(aten_backend(), Rank1Kind::kWeightDecay, "spectral_weight_decay", W, lam,
                    iters, u);
}

}  // namespace

TORCH_LIBRARY_IMPL(lipschitz, CPU, m) {
  m.impl("power_iteration", &power_iteration_cpu);
  m.impl("spectral_normalize", &spectral_normalize_cpu);
  m.impl("spectral_hammer", &spectral_hammer_cpu);
  m.impl("spectral_weight_decay", &spectral_weight_decay_cpu);
}

}  // namespace lipschitz
