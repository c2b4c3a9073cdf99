// Argument checks shared by the CPU and CUDA kernels. Messages name the op and
// the argument, so users see e.g. "orthogonalize: argument 'G' must ...".
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

namespace lipschitz {

// Every kernel picks its own compute and GEMM dtypes (and the hard cap's certificate bounds
// float32 rounding): a caller's torch.autocast region must not recast the ATen calls inside
// it. One of these at the top of a kernel's pipeline keeps autocast out until it returns.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

inline void check_matrix_batch(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.defined(), op, ": argument '", arg, "' is undefined");
  TORCH_CHECK(t.dim() >= 2, op, ": argument '", arg,
              "' must have rank >= 2 (shape [..., m, n]), got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": argument '", arg,
              "' must be a floating-point tensor (float32, float64, float16 or bfloat16), got ",
              t.scalar_type());
  TORCH_CHECK(!t.is_sparse(), op, ": argument '", arg, "' must be a dense (strided) tensor");
}

inline void check_nonnegative(double v, const char* op, const char* arg) {
  TORCH_CHECK(v >= 0.0 && std::isfinite(v), op, ": argument '", arg,
              "' must be finite and >= 0, got ", v);
}

inline void check_positive(double v, const char* op, const char* arg) {
  TORCH_CHECK(v > 0.0 && std::isfinite(v), op, ": argument '", arg,
              "' must be finite and > 0, got ", v);
}

// Leading dims flattened: [..., m, n] -> [B, m, n] (a view when possible).
inline at::Tensor as_batch3d(const at::Tensor& t) {
  const auto m = t.size(-2), n = t.size(-1);
  return t.reshape({-1, m, n});
}

}  // namespace lipschitz
