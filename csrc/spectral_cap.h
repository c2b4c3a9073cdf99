// The spectral caps (soft cap, hard cap, orthogonal projection, exact SVD clip)
// as batched pipelines over [B, m, n], shared by the CPU and CUDA kernels. The
// Backend (csrc/backend.h) says which dtypes to compute in and supplies the
// elementwise steps a device may fuse; everything else is ATen (batched GEMMs:
// BLAS on CPU, cuBLAS on CUDA), with every Gram matrix formed on the SMALL side.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>

#include "backend.h"
#include "checks.h"
#include "newton_schulz.h"
#include "ns_coefficients.h"
#include "power_iteration.h"

namespace lipschitz {

// ---------------------------------------------------------------------------
// small-side products shared by the soft cap and the eigh hard cap

// c * G with G = X^T X (tall X, m > n) or X X^T (wide or square): the Gram matrix
// of the SMALL side, [B, k, k] with k = min(m, n). A scalar c rides in the GEMM's
// alpha (beta = 0: the uninitialized self is never read).
inline at::Tensor small_side_gram(const at::Tensor& X, double c = 1.0) {
  const bool tall = X.size(1) > X.size(2);
  const int64_t k = tall ? X.size(2) : X.size(1);
  const at::Tensor L = tall ? X.mT() : X, R = tall ? X : X.mT();
  if (c == 1.0) return at::bmm(L, R);
  return at::baddbmm(at::empty({X.size(0), k, k}, X.options()), L, R, /*beta=*/0.0, /*alpha=*/c);
}

// X + c * X M (tall X) or X + c * M X (wide or square), M [B, k, k] on the small
// side: one GEMM with the residual in its epilogue when X and M share a dtype.
inline at::Tensor small_side_update(const at::Tensor& X, const at::Tensor& M, double c) {
  const bool tall = X.size(1) > X.size(2);
  return tall ? at::baddbmm(X, X, M, /*beta=*/1.0, /*alpha=*/c)
              : at::baddbmm(X, M, X, /*beta=*/1.0, /*alpha=*/c);
}

// ---------------------------------------------------------------------------
// soft cap: the two rounds W1 = W (I - a W^T W), W' = W1 (I + a W1^T W1) as ONE update
//
// With G = W^T W and x = a G (every power of G commutes with G), W1^T W1 = G (I - x)^2, so
// W' = W (I - x)(I + x (I - x)^2) = W (I - 3 x^2 + 3 x^3 - x^4) = W - W P,
// P = H (H - 3 x + 3 I), H = x^2 (docs/soft_cap.md: the derivation, checked in float64).
// Products: A = x (the Gram, a in its alpha), H = A A, P = H R with R = H - 3 A + 3 I
// (one elementwise pass + the diagonal), then W - W P with the residual fused: four
// batched GEMMs, 2 m k^2 + 2 k^3 multiply-adds (k = min(m, n), m the large side) where
// the two rounds cost 4 m k^2: 1.6x fewer at aspect 4, equal for square weights; and W
// is rounded once instead of twice.

// alpha: a per-matrix [B, 1, 1] tensor, or undefined to use alpha_scalar. X: the
// iterate in the state dtype; the products run in the GEMM dtype.
inline at::Tensor soft_cap_one_update(const Backend& be, const at::Tensor& X, const at::Tensor& alpha,
                                      double alpha_scalar, at::ScalarType gemm) {
  const at::Tensor Xg = X.to(gemm);
  const at::Tensor A = alpha.defined() ? (small_side_gram(Xg) * alpha).to(gemm)
                                       : small_side_gram(Xg, alpha_scalar);
  const at::Tensor H = at::bmm(A, A);
  at::Tensor R = at::add(H, A, /*alpha=*/-3.0);
  R.diagonal(0, -2, -1).add_(3.0);
  const at::Tensor P = at::bmm(H, R);
  if (X.scalar_type() == gemm) return small_side_update(X, P, -1.0);
  // wider iterate: the product in the GEMM dtype, added by the backend's fused axpy
  const bool tall = X.size(1) > X.size(2);
  const at::Tensor WP = tall ? at::bmm(Xg, P) : at::bmm(P, Xg);
  return be.axpy(X, WP, at::full({X.size(0), 1, 1}, -1.0, X.options()));
}

inline at::Tensor soft_cap_run(const Backend& be, const at::Tensor& W, const at::Tensor& alpha3,
                               double alpha_scalar) {
  const auto st = be.state(W.scalar_type());
  at::Tensor X = as_batch3d(W).to(st);
  const at::Tensor a = alpha3.defined() ? alpha3.to(float_or_double(st)) : alpha3;
  X = soft_cap_one_update(be, X, a, alpha_scalar, be.gemm(W.scalar_type()));
  return X.reshape(W.sizes()).to(W.scalar_type()).contiguous();
}

inline at::Tensor soft_cap_impl(const Backend& be, const at::Tensor& W, double alpha) {
  const NoAutocast no_autocast;
  const char* op = "spectral_soft_cap";
  check_matrix_batch(W, op, "W");
  check_nonnegative(alpha, op, "alpha");
  if (W.numel() == 0) return at::empty(W.sizes(), W.options());
  return soft_cap_run(be, W, at::Tensor(), alpha);
}

inline at::Tensor soft_cap_per_matrix_impl(const Backend& be, const at::Tensor& W,
                                           const at::Tensor& alpha) {
  const NoAutocast no_autocast;
  const char* op = "spectral_soft_cap";
  check_matrix_batch(W, op, "W");
  TORCH_CHECK(at::isFloatingType(alpha.scalar_type()), op,
              ": argument 'alpha' must be a float or a floating-point tensor, got ",
              alpha.scalar_type());
  TORCH_CHECK(alpha.device() == W.device(), op, ": argument 'alpha' must be on W's device (",
              W.device(), "), got ", alpha.device());
  const auto batch_shape = W.sizes().slice(0, W.dim() - 2);
  TORCH_CHECK(alpha.dim() == 0 || alpha.sizes() == batch_shape, op,
              ": argument 'alpha' must be a scalar or have W's batch shape ", batch_shape,
              " (one alpha per matrix), got ", alpha.sizes());
  if (W.numel() == 0) return at::empty(W.sizes(), W.options());
  const int64_t batch = W.numel() / (W.size(-2) * W.size(-1));
  return soft_cap_run(be, W, alpha.reshape({-1, 1, 1}).expand({batch, 1, 1}), 0.0);
}

// ---------------------------------------------------------------------------
// msign (polar factor) by Polar Express Newton-Schulz, and what is built on it

// The hard cap's Newton-Schulz steps (both msigns; the polynomial's quintics) run on the
// small Gram matrix (gram_newton_schulz_steps, csrc/newton_schulz.h) where that needs
// fewer multiply-adds and its restarts are few: float32/float64 GEMMs and aspect
// max(m, n) / min(m, n) >= 2 (ten float32 steps: 8 k^2 l + 28 k^3 against 20 k^2 l + 10 k^3).
inline bool cap_uses_gram(const at::Tensor& X, at::ScalarType gemm) {
  const int64_t k = std::min(X.size(-2), X.size(-1)), l = std::max(X.size(-2), X.size(-1));
  return (gemm == at::kFloat || gemm == at::kDouble) && l >= 2 * k;
}

inline at::Tensor cap_ns_steps(const at::Tensor& X, const NSPlan& plan, bool gram) {
  return gram && cap_uses_gram(X, X.scalar_type()) ? gram_newton_schulz_steps(X, plan)
                                                  : newton_schulz_steps(X, plan);
}

// Normalized by the Frobenius norm (accumulated in float64); a zero matrix stays zero.
// gram: the steps by cap_ns_steps (the hard cap) rather than always the standard ones.
inline at::Tensor msign_batched(const at::Tensor& X, int64_t steps, at::ScalarType gemm,
                                const char* op, bool gram = false) {
  const NSPlan plan = make_ns_plan(steps, "polar_express", {}, op);
  const at::Tensor norm =
      at::linalg_vector_norm(X, 2, at::IntArrayRef{-2, -1}, /*keepdim=*/true, at::kDouble);
  // zero -> zero (not 0 * inf), NaN -> NaN, and a tiny norm cannot overflow the scale
  const double big = X.scalar_type() == at::kDouble ? 1e300 : 1e38;
  const at::Tensor inv =
      at::where(norm == 0, at::zeros_like(norm), (1.0 / (norm * plan.norm_scale)).clamp_max(big))
          .to(X.scalar_type());
  return cap_ns_steps((X * inv).to(gemm), plan, gram).to(X.scalar_type());
}

inline void check_steps(int64_t steps, const char* op) {
  TORCH_CHECK(steps >= 1 && steps <= 100, op, ": argument 'steps' must be in [1, 100], got ", steps);
}

// hardcap_b(X) = 1/2 [b Q + X - (b Q - X) msign(b Q - X)^T Q], Q = msign(X):
// with X = U S V^T this is U min(S, b) V^T. Zero singular values stay zero
// (msign maps them to 0, so every term vanishes in their directions).
inline at::Tensor hard_cap_msign(const at::Tensor& X, const at::Tensor& b /*[B, 1, 1]*/, int64_t steps,
                                 at::ScalarType gemm, const char* op) {
  const bool tall = X.size(1) > X.size(2);
  const at::Tensor Q = msign_batched(X, steps, gemm, op, /*gram=*/true);
  const at::Tensor D = Q * b - X;
  const at::Tensor R = msign_batched(D, steps, gemm, op, /*gram=*/true);
  const at::Tensor Dg = D.to(gemm), Rg = R.to(gemm), Qg = Q.to(gemm);
  const at::Tensor T = tall ? at::bmm(Dg, at::bmm(Rg.mT(), Qg))   // R^T Q is n x n
                            : at::bmm(at::bmm(Dg, Rg.mT()), Qg);  // D R^T is m x m
  return (Q * b + X - T.to(X.scalar_type())) * 0.5;
}

// The paper's 4-step odd quintic approximating min(1, s); docs/theory.md, section 2.
inline NSPlan hard_cap_polynomial_plan() {
  NSPlan plan;
  plan.coeffs = {{0.805032, 0.206361, -0.019763},
                 {0.649867, 0.162935, -0.011150},
                 {1.810259, -0.200265, 0.008251},
                 {1.004384, -0.183490, 0.014413}};
  return plan;
}

// The quintic is accurate for s <~ 3.5 and diverges above ~4 (f(4.5) ~ 3e81).
// Matrices whose power-iteration estimate of sigma_1 / b exceeds this are first
// scaled so that the estimate becomes it; the 15% margin to 3.5 absorbs the
// estimate's (downward) error.
constexpr double kPolynomialPrescale = 3.0;

// On the Gram path (cap_uses_gram) the pre-scale's estimate iterates on the small Gram
// matrix G of X, which the Newton-Schulz steps then start from (as f^2 G for the iterate
// f X, f = c / b): the large matrix is read once for both, where power iteration on it
// reads it 2 iters times. G of X (entries < 2), not of X / b: no overflow for a tiny b.
inline at::Tensor hard_cap_polynomial(const at::Tensor& X, const at::Tensor& b /*[B, 1, 1]*/,
                                      int64_t iters, at::ScalarType gemm, const char* op) {
  if (cap_uses_gram(X, gemm)) {
    const at::Tensor Xg = X.to(gemm);
    const at::Tensor G = small_side_gram(Xg);
    at::Tensor v = start_vector(G, std::nullopt, op);  // [B, k, 1]
    for (int64_t i = 0; i < iters; ++i) v = normalize_rows(at::bmm(G, v));
    // sqrt(||G v||), v a unit vector: a lower bound on sigma_1(X), as power iteration gives
    const at::Tensor sigma =
        at::linalg_vector_norm(at::bmm(G, v), 2, at::IntArrayRef{-2, -1}, /*keepdim=*/true).sqrt() / b;
    const at::Tensor f =
        at::minimum(at::ones_like(sigma), kPolynomialPrescale / sigma.clamp_min(1e-30)) / b;
    const at::Tensor out =
        gram_newton_schulz_steps_from(Xg * f, hard_cap_polynomial_plan(), G * (f * f), /*restart=*/false);
    return out.to(X.scalar_type()) * b;
  }
  at::Tensor Y = X / b;
  const Triplet t = power_iteration_batched(Y.to(float_or_double(Y.scalar_type())), iters,
                                            std::nullopt, op);
  const at::Tensor c = at::minimum(at::ones_like(t.sigma),
                                   kPolynomialPrescale / t.sigma.clamp_min(1e-30));
  Y = (Y * c.view({-1, 1, 1})).to(gemm);
  return cap_ns_steps(Y, hard_cap_polynomial_plan(), /*gram=*/true).to(X.scalar_type()) * b;
}

// Exact cap through the eigendecomposition of the Gram matrix on the small side:
// with G = X^T X = V diag(l) V^T (tall X; X X^T for wide), U min(S, b) V^T =
// X - X V diag(g) V^T, g = max(0, 1 - b / sqrt(l)). g is a Lipschitz function of
// l that vanishes below b^2, so clustered or tiny eigenvalues (whose eigenvectors
// the solver cannot separate) cost nothing; error ~ eps * ||X||. One Gram, one
// eigh of the small side, two small-side GEMMs: on CPU and for small matrices
// several times cheaper than two msigns. A matrix with a non-finite entry is NaN.
// X: scaled by max_abs_scale (entries < 2), zero where not finite; G: its small-side Gram
// matrix (the caller forms it: its trace decides the precision); `finite` [B, 1, 1]: whether
// each matrix was finite (nullopt: all were, no pass over X is spent on selecting them).
// The update itself, shared with the certified cap below. On CPU only the r eigenvectors with
// g > 0 (l > b^2) enter when r <= k / 2 (the largest r over the batch, read on the host: no
// device to wait for): X - (X V_r) A^T (tall) or X - A (V_r^T X) (wide), A = V_r diag(g_r),
// costs 2 k l r multiply-adds where forming M = V g V^T and X M costs k^3 + k^2 l.
struct EighCapUpdate {
  at::Tensor out;    // X's shape and orientation
  int64_t r = 0;     // eigenvalues above the cap (the batch's most); k where not counted
  at::Tensor A, Vr;  // 2 r <= k: the low-rank factors, and P = fl(X V_r) / fl(V_r^T X)
  at::Tensor P;
  at::Tensor M;      // otherwise: M = V g V^T [B, k, k]
};

inline EighCapUpdate eigh_cap_update(const at::Tensor& X, const at::Tensor& G, const at::Tensor& b /*[B, 1, 1]*/) {
  auto [lam, V] = at::linalg_eigh(G);  // ascending
  // l <= 0 (rounding of a zero direction): rsqrt = inf, g = max(0, -inf) = 0
  const at::Tensor g = (1.0 - b.view({-1, 1}) * at::rsqrt(lam.clamp_min(0))).clamp_min(0);
  const int64_t k = G.size(-1);
  const bool tall = X.size(1) > X.size(2);
  EighCapUpdate u;
  u.r = X.is_cpu() && k >= 2 ? (g > 0).sum(-1).max().item<int64_t>() : k;
  if (u.r == 0) {
    u.out = X.clone();
  } else if (2 * u.r <= k) {
    u.Vr = V.narrow(-1, k - u.r, u.r);
    u.A = u.Vr * g.narrow(-1, k - u.r, u.r).unsqueeze(-2);
    u.P = tall ? at::bmm(X, u.Vr) : at::bmm(u.Vr.mT(), X);
    u.out = tall ? at::baddbmm(X, u.P, u.A.mT(), /*beta=*/1.0, /*alpha=*/-1.0)
                 : at::baddbmm(X, u.A, u.P, /*beta=*/1.0, /*alpha=*/-1.0);
  } else {
    u.M = at::bmm(V * g.unsqueeze(-2), V.mT());
    u.out = small_side_update(X, u.M, -1.0);
  }
  return u;
}

inline at::Tensor hard_cap_eigh(const at::Tensor& X, const at::Tensor& G, const at::Tensor& b /*[B, 1, 1]*/,
                                const std::optional<at::Tensor>& finite) {
  const at::Tensor out = eigh_cap_update(X, G, b).out;
  if (!finite.has_value()) return out;
  return at::where(*finite, out, at::full({}, std::numeric_limits<double>::quiet_NaN(), X.options()));
}

// The eigh cap of W3 [B, m, n] (float32 or float64) at sigma_max, on X = W3 / s with
// s = max_abs_scale(W3) (a power of two: exact, and NaN exactly for a non-finite matrix),
// scaled back. float32 eigh resolves singular values near the cap to ~1e-7 (||X|| / b)^2
// relative: far above the cap (Frobenius > 100 b) the batch runs in float64 instead. The
// Frobenius norm is the trace of the Gram matrix the cap needs anyway (no pass over W3 for
// it); one host read of B finiteness flags and that test together.
inline at::Tensor hard_cap_eigh_batch(const at::Tensor& W3, double sigma_max) {
  const at::Tensor s = max_abs_scale(W3);
  const at::Tensor finite = at::isfinite(s);
  at::Tensor X = W3 / s;
  at::Tensor G = small_side_gram(X);
  const at::Tensor fro2 = G.diagonal(0, -2, -1).sum(-1).to(at::kDouble) * s.view({-1}).to(at::kDouble).square();
  const double limit = 100.0 * sigma_max;
  const at::Tensor flags = at::stack({finite.all(), (fro2 > limit * limit).any()}).cpu();
  const bool all_finite = flags[0].item<bool>();
  const bool wide_range = W3.scalar_type() != at::kDouble && flags[1].item<bool>();
  if (!all_finite) X = at::where(finite, X, at::zeros({}, X.options()));
  if (wide_range) X = X.to(at::kDouble);
  if (!all_finite || wide_range) G = small_side_gram(X);
  const at::Tensor b = (sigma_max / s).to(X.scalar_type());
  const at::Tensor out = hard_cap_eigh(X, G, b, all_finite ? std::nullopt : std::optional<at::Tensor>(finite));
  return out * s.to(X.scalar_type());
}

inline at::Tensor hard_cap_impl(const Backend& be, const at::Tensor& W, double sigma_max,
                                c10::string_view method, int64_t steps, int64_t iters) {
  const NoAutocast no_autocast;
  const char* op = "spectral_hard_cap";
  check_matrix_batch(W, op, "W");
  check_nonnegative(sigma_max, op, "sigma_max");
  check_steps(steps, op);
  check_iters(iters, op);
  TORCH_CHECK(method == "msign" || method == "polynomial" || method == "eigh", op,
              ": argument 'method' must be 'msign', 'polynomial' or 'eigh', got '", std::string(method),
              "'");
  if (W.numel() == 0) return at::empty(W.sizes(), W.options());
  if (sigma_max == 0.0) return W * 0;  // keeps NaN as NaN
  // The cap is scale-equivariant, cap_b(X) = s cap_{b/s}(X / s): with s = max|X| no Gram
  // matrix or sum of the formulas can overflow (float32 entries up to its max).
  const at::Tensor W3 = as_batch3d(W).to(float_or_double(W.scalar_type()));
  if (method == "eigh") {  // eigh has no half-precision kernels: float32 (float64 for float64)
    return hard_cap_eigh_batch(W3, sigma_max).reshape(W.sizes()).to(W.scalar_type()).contiguous();
  }
  const at::Tensor s = max_abs_scale(W3);
  const at::Tensor X = (W3 / s).to(be.state(W.scalar_type()));
  const at::Tensor bs = (sigma_max / s).to(X.scalar_type());  // [B, 1, 1] per-matrix cap
  const auto gemm = be.gemm(W.scalar_type());
  const at::Tensor out = method == "msign" ? hard_cap_msign(X, bs, steps, gemm, op)
                                           : hard_cap_polynomial(X, bs, iters, gemm, op);
  return (out.to(W3.scalar_type()) * s).reshape(W.sizes()).to(W.scalar_type()).contiguous();
}

// ---------------------------------------------------------------------------
// The eigh cap with its own certificate (float32 on CPU; docs/kernels.md, "The hard cap's
// certified output": the proof). The guard of the Python wrapper certifies an output by the Cholesky test
// on its float64 Gram matrix. Here the float64 Gram matrix G of X (= W / s, exact) is
// formed once, serves the eigendecomposition (rounded to float32) and the certificate:
// with N the small-side matrix the update applied in exact arithmetic (out = N X + E, E the
// update's float32 rounding), ||out|| <= ||N X|| + ||E|| and ||N X||^2 = lambda_max(N G N^T),
// where G's own rounding is bounded by gamma_l tr(G) (float32 products are exact in
// float64). So ||out|| < t when t_N = t - ||E||_bound > 0 and t_N^2 I - N G N^T - e I has a
// Cholesky factor, e covering G's and N G N^T's float64 rounding. No trust in the eigensolver:
// N is whatever float32 matrix the update used. Returns (out [..., m, n], certified [...]);
// certified is all false (the wrapper's guard decides) for float64 weights, off the CPU, below
// aspect 3 or above k = 384 (where it does not pay, see below), for a non-finite matrix in the
// batch or one far above the cap (Frobenius norm > 100 sigma_max, where the cap runs in float64).

// gamma_n = n u / (1 - n u): the relative rounding bound of an n-term float sum or dot product
inline double rounding_gamma(double n, double u) { return n * u / (1.0 - n * u); }

// X X^T of X [B, k, l] in two row blocks from k = 256 up: three block products instead of the
// four the full GEMM computes (G12 = G21^T exactly, so G is exactly symmetric); smaller k keeps
// the one GEMM, whose blocks would be too thin to run at its speed.
inline at::Tensor symmetric_gram(const at::Tensor& X) {
  const int64_t k = X.size(1);
  if (k < 256) return at::bmm(X, X.mT());
  const int64_t h = k / 2;
  const at::Tensor X1 = X.narrow(1, 0, h), X2 = X.narrow(1, h, k - h);
  at::Tensor G = at::empty({X.size(0), k, k}, X.options());
  G.narrow(1, 0, h).narrow(2, 0, h).copy_(at::bmm(X1, X1.mT()));
  const at::Tensor G21 = at::bmm(X2, X1.mT());
  G.narrow(1, h, k - h).narrow(2, 0, h).copy_(G21);
  G.narrow(1, 0, h).narrow(2, h, k - h).copy_(G21.mT());
  G.narrow(1, h, k - h).narrow(2, h, k - h).copy_(at::bmm(X2, X2.mT()));
  return G;
}

inline std::tuple<at::Tensor, at::Tensor> hard_cap_eigh_certified_impl(const Backend& be, const at::Tensor& W,
                                                                        double sigma_max, double slack) {
  const NoAutocast no_autocast;
  const char* op = "_spectral_hard_cap_eigh_certified";
  check_matrix_batch(W, op, "W");
  check_nonnegative(sigma_max, op, "sigma_max");
  check_nonnegative(slack, op, "slack");
  const auto batch_shape = W.sizes().slice(0, W.dim() - 2);
  const auto none = [&] { return at::zeros(batch_shape, W.options().dtype(at::kBool)); };
  if (W.numel() == 0) return {at::empty(W.sizes(), W.options()), none()};
  const int64_t m = W.size(-2), n = W.size(-1);
  const int64_t k = std::min(m, n), l = std::max(m, n);
  // Below aspect 3 the float64 Gram matrix of X (in place of the float32 one) and N G N^T
  // cost more than the guard's float64 Gram matrix of the output that they save; beyond
  // k = 384 the update's float32 rounding bound (k u per dot product) outgrows a 1e-3 slack
  // and the certificate would fail anyway.
  if (sigma_max == 0.0 || W.scalar_type() != at::kFloat || !W.is_cpu() || l < 3 * k || k > 384)
    return {hard_cap_impl(be, W, sigma_max, "eigh", 10, 16), none()};

  const at::Tensor W3 = as_batch3d(W);
  const bool tall = m > n;
  const at::Tensor s = max_abs_scale(W3);  // [B, 1, 1], a power of two (exact division)
  const at::Tensor finite = at::isfinite(s);
  const at::Tensor X = W3 / s;
  const at::Tensor X64 = X.to(at::kDouble);
  const at::Tensor G = symmetric_gram(tall ? X64.mT() : X64);  // float32 products are exact in float64
  const at::Tensor trG = G.diagonal(0, -2, -1).sum(-1);  // ||X||_F^2 [B]
  const at::Tensor s64 = s.view({-1}).to(at::kDouble);
  const double limit = 100.0 * sigma_max;
  const at::Tensor flags = at::stack({finite.all(), (trG * s64.square() > limit * limit).any()}).cpu();
  if (!flags[0].item<bool>() || flags[1].item<bool>())
    return {hard_cap_eigh_batch(W3, sigma_max).reshape(W.sizes()).to(W.scalar_type()).contiguous(), none()};

  const EighCapUpdate u = eigh_cap_update(X, G.to(at::kFloat), (sigma_max / s).to(at::kFloat));
  const int64_t r = u.r;
  const double u32 = std::ldexp(1.0, -24), u64 = std::ldexp(1.0, -53), tiny = std::ldexp(1.0, -149);
  const auto fro = [](const at::Tensor& t) {
    return at::linalg_vector_norm(t, 2, at::IntArrayRef{-2, -1}, false, at::kDouble).view({-1});
  };
  const at::Tensor fX = trG.sqrt();  // ||X||_F
  at::Tensor C, normN, errE;
  if (r == 0) {  // nothing above the cap: the identity
    C = G;
    normN = at::ones_like(fX);
    errE = at::zeros_like(fX);
  } else if (u.M.defined()) {
    at::Tensor N = -u.M.to(at::kDouble);
    N.diagonal(0, -2, -1).add_(1.0);
    C = at::bmm(at::bmm(N, G), N.mT());
    const at::Tensor fM = fro(u.M);
    normN = 1.0 + fM;
    // out = fl(X - M X): |out - (X - M X)| <= gamma_{k+1} (|X| + |M| |X|); underflow 2^-149 a term
    const double uf = tiny * static_cast<double>(k + 1) * std::sqrt(static_cast<double>(k * l));
    errE = rounding_gamma(k + 1, u32) * (fX + fM * fX) + uf;
  } else {
    // N = I - A Vr^T, and C = N G N^T = G - A H^T - (H - A S) A^T with H = G Vr, S = Vr^T H
    const at::Tensor A64 = u.A.to(at::kDouble), V64 = u.Vr.to(at::kDouble);
    const at::Tensor H = at::bmm(G, V64);
    const at::Tensor S = at::bmm(V64.mT(), H);
    C = at::baddbmm(G, A64, H.mT(), 1.0, -1.0);
    C = at::baddbmm(C, at::baddbmm(H, A64, S, 1.0, -1.0), A64.mT(), 1.0, -1.0);
    const at::Tensor fA = fro(A64), fV = fro(V64), fP = fro(u.P);
    normN = 1.0 + fA * fV;
    // P = fl(Vr^T X): |P - Vr^T X| <= gamma_k |Vr|^T |X|; out = fl(X - A P):
    // |out - (X - A P)| <= gamma_{r+1} (|X| + |A| |P|); underflow: <= (terms) 2^-149 per entry
    // (transposed for tall X: the same bounds)
    const double uf = tiny * static_cast<double>(k + r + 1) * std::sqrt(static_cast<double>(k * l));
    errE = fA * (rounding_gamma(k, u32) * fV * fX) + rounding_gamma(r + 1, u32) * (fX + fA * fP) + uf;
  }
  // float64 rounding: G (l-term sums of exact products) and C (a few products of k- and
  // r-term sums), both bounded generously through Frobenius norms
  const at::Tensor fG = at::linalg_vector_norm(G, 2, at::IntArrayRef{-2, -1}).view({-1});
  const at::Tensor eG = rounding_gamma(l, u64) * trG;
  const at::Tensor eC = 4.0 * rounding_gamma(2 * k + 2 * r + 4, u64) * (fG + eG) * normN.square();
  const at::Tensor t = (sigma_max * (1.0 + slack)) / s64;  // the target on X's scale
  // out * s is exact unless it lands among the subnormals: <= 2^-150 per entry there
  const at::Tensor tN = t - errE - std::sqrt(static_cast<double>(k * l)) * std::ldexp(1.0, -150) / s64;
  const at::Tensor margin = tN.square() - eC - normN.square() * eG;
  at::Tensor T = -C;
  T.diagonal(0, -2, -1).add_(margin.unsqueeze(-1));
  const at::Tensor certified = (std::get<1>(at::linalg_cholesky_ex(T)) == 0) & (tN > 0) & (margin > 0);
  at::Tensor out = u.out;
  out.mul_(s);  // out is this function's own tensor: no second allocation for the scaling back
  return {out.reshape(W.sizes()).contiguous(), certified.reshape(batch_shape)};
}

inline at::Tensor orthogonal_project_impl(const Backend& be, const at::Tensor& W, double sigma_max,
                                          int64_t steps) {
  const NoAutocast no_autocast;
  const char* op = "orthogonal_project";
  check_matrix_batch(W, op, "W");
  check_nonnegative(sigma_max, op, "sigma_max");
  check_steps(steps, op);
  if (W.numel() == 0) return at::empty(W.sizes(), W.options());
  const at::Tensor X = as_batch3d(W).to(be.state(W.scalar_type()));
  const at::Tensor out = msign_batched(X, steps, be.gemm(W.scalar_type()), op) * sigma_max;
  return out.reshape(W.sizes()).to(W.scalar_type()).contiguous();
}

// Exact U min(S, b) V^T by SVD in float32 (float64 for float64 input). The SVD
// refuses non-finite input, so this checks first and names the argument.
inline at::Tensor svd_cap_impl(const at::Tensor& W, double sigma_max) {
  const NoAutocast no_autocast;
  const char* op = "svd_cap";
  check_matrix_batch(W, op, "W");
  check_nonnegative(sigma_max, op, "sigma_max");
  if (W.numel() == 0) return at::empty(W.sizes(), W.options());
  const at::Tensor X = as_batch3d(W).to(float_or_double(W.scalar_type()));
  TORCH_CHECK(at::isfinite(X).all().item<bool>(), op,
              ": argument 'W' contains non-finite values (NaN or inf); the SVD is undefined");
  auto [U, S, Vh] = at::linalg_svd(X, /*full_matrices=*/false);
  const at::Tensor out = at::bmm(U * S.clamp_max(sigma_max).unsqueeze(-2), Vh);
  return out.reshape(W.sizes()).to(W.scalar_type()).contiguous();
}

}  // namespace lipschitz
