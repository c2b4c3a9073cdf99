// What a device contributes to the batched constraint pipelines (csrc/spectral_cap.h,
// csrc/power_iteration.h): the dtypes to compute in and the elementwise steps it may
// fuse. The CPU backend is plain ATen; the CUDA ones live in csrc/cuda/*.cu.
#pragma once

#include <functional>

#include <ATen/ATen.h>

namespace lipschitz {

struct Backend {
  // dtype that holds the iterate (and accumulates residual updates); the CUDA
  // backend keeps bf16 input in bf16 (one rounding per step, all-GEMM pipeline)
  at::ScalarType (*state)(at::ScalarType input);
  // dtype of GEMM operands (bf16 on CUDA: fp32 accumulation inside cuBLAS)
  at::ScalarType (*gemm)(at::ScalarType input);
  // X + P * coef, coef [B, 1, 1]; X in the state dtype, P in the GEMM dtype
  std::function<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)> axpy;
  // scale[b] * W + coef[b] * u v^T, written in W's dtype (W is the caller's [B, m, n])
  std::function<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&)>
      rank1;
};

inline at::ScalarType float_or_double(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor axpy_aten(const at::Tensor& X, const at::Tensor& P, const at::Tensor& coef) {
  return at::addcmul(X, P.to(X.scalar_type()), coef);
}

inline at::Tensor rank1_aten(const at::Tensor& W, const at::Tensor& scale, const at::Tensor& coef,
                             const at::Tensor& u, const at::Tensor& v) {
  const auto st = scale.scalar_type();
  at::Tensor out = at::baddbmm(W.to(st) * scale.view({-1, 1, 1}), (u * coef.unsqueeze(-1)).unsqueeze(-1),
                               v.unsqueeze(-2));
  return out.to(W.scalar_type());
}

// Plain ATen in float32 (float64 for float64 input): the CPU backend.
inline const Backend& aten_backend() {
  static const Backend be{&float_or_double, &float_or_double, &axpy_aten, &rank1_aten};
  return be;
}

}  // namespace lipschitz
