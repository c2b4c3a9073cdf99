// Batched power iteration for the top singular triplet, and the rank-1 weight
// constraints built on it (spectral normalization, hammer, spectral weight
// decay): the pipeline and the op implementations, shared by the CPU and CUDA
// kernels (csrc/cpu/power_iteration.cpp, csrc/cuda/power_iteration.cu). The math
// is ATen (batched GEMV / GEMM), run in float32 (float64 for float64 input).
#pragma once

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

#include "backend.h"
#include "checks.h"

namespace lipschitz {

struct Triplet {
  at::Tensor sigma;  // [B]
  at::Tensor u;      // [B, m], unit (zero for a zero matrix)
  at::Tensor v;      // [B, n], unit (zero for a zero matrix)
};

inline void check_iters(int64_t iters, const char* op) {
  TORCH_CHECK(iters >= 1 && iters <= 10000, op, ": argument 'iters' must be in [1, 10000], got ",
              iters);
}

// A fixed, deterministic start: 0.5 + frac(i * golden ratio) is positive (so it
// is never orthogonal to a non-negative singular vector such as the all-ones
// one) and well spread (so it is not orthogonal to the usual structured ones).
inline at::Tensor default_start(int64_t batch, int64_t m, const at::TensorOptions& opts) {
  const at::Tensor i = at::arange(1, m + 1, opts.dtype(at::kDouble));
  return (at::frac(i * 0.6180339887498949) + 0.5).to(opts.dtype()).expand({batch, m});
}

inline at::Tensor normalize_rows(const at::Tensor& x /*[B, k, 1]*/) {
  // Zero stays zero (a zero matrix has no direction); NaN stays NaN.
  return x / at::linalg_vector_norm(x, 2, at::IntArrayRef{-2}, /*keepdim=*/true).clamp_min(1e-30);
}

// `u` (optional) is the warm start [..., m] with the batch shape of W; rows that
// are zero or non-finite fall back to the default start so a stale state can
// never lock the iteration at zero or NaN.
inline at::Tensor start_vector(const at::Tensor& W3, const std::optional<at::Tensor>& u,
                               const char* op) {
  const int64_t batch = W3.size(0), m = W3.size(1);
  at::Tensor u0 = default_start(batch, m, W3.options());
  if (!u.has_value() || !u->defined()) return u0.unsqueeze(-1);
  TORCH_CHECK(u->device() == W3.device(), op, ": argument 'u' must be on W's device (", W3.device(),
              "), got ", u->device());
  TORCH_CHECK(at::isFloatingType(u->scalar_type()), op,
              ": argument 'u' must be a floating-point tensor, got ", u->scalar_type());
  TORCH_CHECK(u->dim() >= 1 && u->size(-1) == m && u->numel() == batch * m, op,
              ": argument 'u' must have shape [..., m] = W.shape[:-1] (m = ", m, ", ", batch,
              " matrices), got ", u->sizes());
  const at::Tensor uu = u->reshape({batch, m}).to(W3.scalar_type());
  const at::Tensor nrm = at::linalg_vector_norm(uu, 2, at::IntArrayRef{-1}, /*keepdim=*/true);
  const at::Tensor ok = at::logical_and(nrm > 0, at::isfinite(nrm));
  return at::where(ok, uu, u0).unsqueeze(-1);
}

// W3: [B, m, n] in the compute dtype. Each iteration applies W^T then W and
// normalizes; the result satisfies sigma = ||W v|| = u^T W v (a lower bound on
// the true top singular value that converges to it). When enough iterations
// are asked for (2 * iters > small side) the Gram matrix of the SMALL side is
// formed once and iterated instead: fewer FLOPs than 2 GEMVs per iteration.
// Per-matrix power of two near the largest |entry| [B, 1, 1] (so dividing by it is exact);
// 1 for a zero matrix and NaN for a non-finite one. Dividing by it first keeps every
// product of an iteration in range, whatever the magnitude of the input.
inline at::Tensor max_abs_scale(const at::Tensor& X3) {
  const at::Tensor mx = at::amax(X3.abs(), at::IntArrayRef{1, 2}, /*keepdim=*/true);
  const at::Tensor nan = at::full({}, std::numeric_limits<double>::quiet_NaN(), mx.options());
  const at::Tensor p2 = at::exp2(at::floor(at::log2(mx.to(at::kDouble)))).to(mx.scalar_type());
  return at::where(mx == 0, at::ones_like(mx), at::where(at::isfinite(mx), p2, nan));
}

inline Triplet power_iteration_scaled(const at::Tensor& W3, int64_t iters,
                                      const std::optional<at::Tensor>& u_init, const char* op);

// The iteration runs on W / max|W| (so entries from 1e-30 to float's max neither underflow
// nor overflow in the Gram matrix and norms); sigma is scaled back.
inline Triplet power_iteration_batched(const at::Tensor& W3, int64_t iters,
                                       const std::optional<at::Tensor>& u_init, const char* op) {
  const at::Tensor s = max_abs_scale(W3);
  Triplet t = power_iteration_scaled(W3 / s, iters, u_init, op);
  t.sigma = t.sigma * s.view({-1});
  return t;
}

inline Triplet power_iteration_scaled(const at::Tensor& W3, int64_t iters,
                                      const std::optional<at::Tensor>& u_init, const char* op) {
  const int64_t m = W3.size(1), n = W3.size(2);
  const int64_t small = std::min(m, n), large = std::max(m, n);
  at::Tensor u = start_vector(W3, u_init, op);  // [B, m, 1]
  at::Tensor v;
  const at::Tensor Wt = W3.mT();
  const double direct = 4.0 * iters * m * n;
  const double gram = 2.0 * small * small * large + 2.0 * (iters - 1) * small * small + 4.0 * m * n;
  if (gram < direct && iters > 1) {
    if (m <= n) {
      const at::Tensor G = at::bmm(W3, Wt);  // [B, m, m]
      for (int64_t i = 0; i + 1 < iters; ++i) u = normalize_rows(at::bmm(G, u));
      v = normalize_rows(at::bmm(Wt, u));
    } else {
      const at::Tensor G = at::bmm(Wt, W3);  // [B, n, n]
      v = normalize_rows(at::bmm(Wt, u));
      for (int64_t i = 0; i + 1 < iters; ++i) v = normalize_rows(at::bmm(G, v));
    }
    iters = 1;  // the final W^T/W pair below
  }
  at::Tensor Wv;
  for (int64_t i = 0; i < iters; ++i) {
    if (i > 0 || !v.defined()) v = normalize_rows(at::bmm(Wt, u));
    Wv = at::bmm(W3, v);
    u = normalize_rows(Wv);
  }
  if (!Wv.defined()) Wv = at::bmm(W3, v);
  at::Tensor sigma = at::linalg_vector_norm(Wv, 2, at::IntArrayRef{-2, -1});
  return {sigma, u.squeeze(-1), v.squeeze(-1)};
}

// The three rank-1 constraints as (scale, coef): out = scale * W + coef * u v^T.
enum class Rank1Kind { kNormalize, kHammer, kWeightDecay };

inline void check_rank1_args(Rank1Kind kind, double param, const char* op) {
  if (kind == Rank1Kind::kWeightDecay) {
    TORCH_CHECK(param >= 0.0 && param <= 1.0, op, ": argument 'lam' must be in [0, 1], got ",
                param);
  } else {
    check_nonnegative(param, op, "sigma_max");
  }
}

// Returns per-matrix (scale [B], coef [B]) in the compute dtype.
inline std::pair<at::Tensor, at::Tensor> rank1_coefficients(Rank1Kind kind, double param,
                                                            const at::Tensor& sigma) {
  switch (kind) {
    case Rank1Kind::kNormalize:  // W / max(1, sigma / sigma_max); sigma_max = 0 -> zero
      return {param / at::maximum(sigma, at::full_like(sigma, param)).clamp_min(1e-30),
              at::zeros_like(sigma)};
    case Rank1Kind::kHammer:  // sigma_1 -> sigma_max, nothing else moves
      return {at::ones_like(sigma), param - sigma};
    case Rank1Kind::kWeightDecay:  // sigma_1 -> (1 - lam) sigma_1
      return {at::ones_like(sigma), -param * sigma};
  }
  TORCH_CHECK(false, "unreachable");
}

// ---------------------------------------------------------------------------
// the ops: power_iteration and the rank-1 constraints

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_impl(
    const at::Tensor& W, int64_t iters, const std::optional<at::Tensor>& u) {
  const NoAutocast no_autocast;
  const char* op = "power_iteration";
  check_matrix_batch(W, op, "W");
  check_iters(iters, op);
  const auto batch_shape = W.sizes().slice(0, W.dim() - 2);
  const auto st = float_or_double(W.scalar_type());
  std::vector<int64_t> su(batch_shape.begin(), batch_shape.end()), sv = su;
  su.push_back(W.size(-2));
  sv.push_back(W.size(-1));
  if (W.numel() == 0) {
    const auto o = W.options().dtype(st);
    return {at::zeros(batch_shape, o), at::zeros(su, o), at::zeros(sv, o)};
  }
  const Triplet t = power_iteration_batched(as_batch3d(W).to(st), iters, u, op);
  return {t.sigma.reshape(batch_shape), t.u.reshape(su), t.v.reshape(sv)};
}

inline std::tuple<at::Tensor, at::Tensor> rank1_impl(const Backend& be, Rank1Kind kind,
                                                     const char* op, const at::Tensor& W,
                                                     double param, int64_t iters,
                                                     const std::optional<at::Tensor>& u) {
  const NoAutocast no_autocast;
  check_matrix_batch(W, op, "W");
  check_rank1_args(kind, param, op);
  check_iters(iters, op);
  const auto st = float_or_double(W.scalar_type());
  std::vector<int64_t> su(W.sizes().begin(), W.sizes().end() - 1);
  if (W.numel() == 0)
    return {at::empty(W.sizes(), W.options()), at::zeros(su, W.options().dtype(st))};
  const at::Tensor W3 = as_batch3d(W);
  const Triplet t = power_iteration_batched(W3.to(st), iters, u, op);
  auto [scale, coef] = rank1_coefficients(kind, param, t.sigma);
  at::Tensor out = be.rank1(W3, scale, coef, t.u, t.v);
  return {out.reshape(W.sizes()).contiguous(), t.u.reshape(su)};
}

}  // namespace lipschitz
