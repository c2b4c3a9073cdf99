// CUDA kernel of lipschitz::orthogonalize: one batched pipeline per call.
//   1. per-matrix sum of squares (float64 accumulation, one pass over G),
//   2. scale + cast to the compute dtype (compute_dtype, default bf16; float64 stays float64),
//   3. Newton-Schulz steps as batched cuBLAS GEMMs with fused epilogues
//      (csrc/newton_schulz.h), Gram matrix on the small side.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "newton_schulz.h"
#include "ns_coefficients.h"
#include "sum_squares.cuh"
#include "ns_symmetric.h"

namespace lipschitz {
namespace {

constexpr int kThreads = 256;

// grid.x = batch * blocks_per_matrix; each block adds its partial sum of
// squares of one matrix into out[b].
template <typename T>
__global__ void sum_squares_kernel(const T* __restrict__ x, int64_t per_matrix,
                                   int blocks_per_matrix, double* __restrict__ out) {
  const double s = lipschitz::block_sum_squares<kThreads>(x, per_matrix, blocks_per_matrix);
  if (threadIdx.x == 0) atomicAdd(out + blockIdx.x / blocks_per_matrix, s);
}

// y = x / (sqrt(sumsq[b]) * norm_scale + eps), cast to the compute type.
template <typename Tin, typename Tout>
__global__ void normalize_cast_kernel(const Tin* __restrict__ x, int64_t per_matrix, int64_t total,
                                      const double* __restrict__ sumsq, double norm_scale,
                                      double eps, Tout* __restrict__ y) {
  using acc_t = std::conditional_t<std::is_same_v<Tout, double>, double, float>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / per_matrix;
    const double denom = sqrt(sumsq[b]) * norm_scale + eps;
    // a zero matrix maps to zero even with eps = 0 (not 0 * inf)
    const acc_t inv = static_cast<acc_t>(denom == 0.0 ? 0.0 : 1.0 / denom);
    y[i] = static_cast<Tout>(static_cast<acc_t>(x[i]) * inv);
  }
}

// Horner form of each odd quintic, in double (the composite is ill-conditioned
// near its fixed points, and this is not a hot path).
template <typename T>
__global__ void ns_polynomial_kernel(const T* __restrict__ s, int64_t n, const double* __restrict__ abc,
                                     int steps, T* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double x = static_cast<double>(s[i]);
    for (int k = 0; k < steps; ++k) {
      const double x2 = x * x;
      x = x * (abc[3 * k] + x2 * (abc[3 * k + 1] + x2 * abc[3 * k + 2]));
    }
    out[i] = static_cast<T>(x);
  }
}

}  // namespace

at::Tensor ns_polynomial_cuda(const at::Tensor& s, int64_t steps, c10::string_view coefficients,
                              at::ArrayRef<double> custom) {
  TORCH_CHECK(at::isFloatingType(s.scalar_type()), "ns_polynomial: argument 's' must be a ",
              "floating-point tensor, got ", s.scalar_type());
  const NSPlan plan = make_ns_plan(steps, coefficients, custom, "ns_polynomial");
  const c10::cuda::CUDAGuard guard(s.device());
  const at::Tensor x = s.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  std::vector<double> flat;
  for (const auto& t : plan.coeffs) flat.insert(flat.end(), t.begin(), t.end());
  const at::Tensor abc =
      at::tensor(flat, at::TensorOptions().dtype(at::kDouble)).to(s.device(), /*non_blocking=*/false);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = static_cast<int>(std::min<int64_t>((x.numel() + kThreads - 1) / kThreads, 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ns_polynomial_cuda", [&] {
    ns_polynomial_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), x.numel(), abc.data_ptr<double>(), static_cast<int>(plan.coeffs.size()),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

namespace {

// Both algorithms (gram: Gram Newton-Schulz, csrc/newton_schulz.h; otherwise the
// standard steps by `backend`, csrc/ns_symmetric.h).
at::Tensor orthogonalize_cuda_impl(const char* op, bool gram, const at::Tensor& G, int64_t steps,
                                   c10::string_view coefficients, at::ArrayRef<double> custom,
                                   double eps, std::optional<at::ScalarType> compute_dtype,
                                   c10::string_view backend) {
  const NoAutocast no_autocast;
  const std::optional<NSBackend> requested = gram ? std::nullopt : parse_ns_backend_arg(backend, op);
  check_matrix_batch(G, op, "G");
  check_nonnegative(eps, op, "eps");
  const NSPlan plan = make_ns_plan(steps, coefficients, custom, op);
  // default bf16 (fp32 accumulation); float64 stays float64
  const auto compute = ns_compute_dtype(G.scalar_type(), compute_dtype, at::kBFloat16);
  TORCH_CHECK(requested != NSBackend::kSymmetric || compute == at::kBFloat16, op,
              ": argument 'backend' = 'symmetric' computes in bfloat16 only, got compute dtype ", compute,
              "; use backend='cublas' or 'default'");
  if (G.numel() == 0) return at::empty(G.sizes(), G.options());
  // the symmetric kernels (csrc/cuda/ns_symmetric.cu) by request, or by default under
  // LIPSCHITZ_NS_BACKEND=symmetric where the compute dtype is bf16
  if (!gram && requested.value_or(ns_backend_from_env()) == NSBackend::kSymmetric && compute == at::kBFloat16)
    return orthogonalize_symmetric_cuda(G, plan, eps);

  const c10::cuda::CUDAGuard guard(G.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor G3 = as_batch3d(G).contiguous();
  const int64_t batch = G3.size(0), per_matrix = G3.size(1) * G3.size(2);

  at::Tensor sumsq = at::zeros({batch}, G.options().dtype(at::kDouble));
  at::Tensor X = at::empty(G3.sizes(), G.options().dtype(compute));

  const int blocks_per_matrix =
      static_cast<int>(std::min<int64_t>((per_matrix + kThreads - 1) / kThreads,
                                         std::max<int64_t>(1, 1024 / std::max<int64_t>(batch, 1))));
  TORCH_CHECK(batch * blocks_per_matrix < (int64_t{1} << 31), op, ": batch too large");
  const int64_t total = batch * per_matrix;
  const int cast_blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "orthogonalize_cuda", [&] {
    sum_squares_kernel<scalar_t><<<static_cast<unsigned>(batch * blocks_per_matrix), kThreads, 0, stream>>>(
        G3.data_ptr<scalar_t>(), per_matrix, blocks_per_matrix, sumsq.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (compute == at::kDouble) {
      normalize_cast_kernel<scalar_t, double><<<cast_blocks, kThreads, 0, stream>>>(
          G3.data_ptr<scalar_t>(), per_matrix, total, sumsq.data_ptr<double>(), plan.norm_scale,
          eps, X.data_ptr<double>());
    } else if (compute == at::kFloat) {
      normalize_cast_kernel<scalar_t, float><<<cast_blocks, kThreads, 0, stream>>>(
          G3.data_ptr<scalar_t>(), per_matrix, total, sumsq.data_ptr<double>(), plan.norm_scale,
          eps, X.data_ptr<float>());
    } else {
      normalize_cast_kernel<scalar_t, at::BFloat16><<<cast_blocks, kThreads, 0, stream>>>(
          G3.data_ptr<scalar_t>(), per_matrix, total, sumsq.data_ptr<double>(), plan.norm_scale,
          eps, X.data_ptr<at::BFloat16>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  X = gram ? gram_newton_schulz_steps(X, plan) : newton_schulz_steps(X, plan);
  return X.reshape(G.sizes()).to(G.scalar_type()).contiguous();
}

}  // namespace

at::Tensor orthogonalize_cuda(const at::Tensor& G, int64_t steps, c10::string_view coefficients,
                              at::ArrayRef<double> custom, double eps,
                              std::optional<at::ScalarType> compute_dtype, c10::string_view backend) {
  return orthogonalize_cuda_impl("orthogonalize", false, G, steps, coefficients, custom, eps, compute_dtype,
                                 backend);
}

// Compiled and tested on CPU only so far: Python never picks it on CUDA by itself
// (ops.orthogonalize(algorithm="auto") resolves to the standard steps there).
at::Tensor orthogonalize_gram_cuda(const at::Tensor& G, int64_t steps, c10::string_view coefficients,
                                   at::ArrayRef<double> custom, double eps,
                                   std::optional<at::ScalarType> compute_dtype) {
  return orthogonalize_cuda_impl("orthogonalize_gram", true, G, steps, coefficients, custom, eps,
                                 compute_dtype, "default");
}

TORCH_LIBRARY_IMPL(lipschitz, CUDA, m) {
  m.impl("orthogonalize", &orthogonalize_cuda);
  m.impl("orthogonalize_gram", &orthogonalize_gram_cuda);
  m.impl("ns_polynomial", &ns_polynomial_cuda);
}

}  // namespace lipschitz
