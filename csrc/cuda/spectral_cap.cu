// CUDA kernels of the spectral caps (soft cap, hard cap, orthogonal projection,
// exact SVD clip). GEMM-heavy ops run their batched cuBLAS GEMMs on bf16
// operands with fp32 accumulation. The soft cap is one update (csrc/spectral_cap.h:
// Gram, H = A A, P = H R, W - W P). bf16 input keeps a bf16 iterate (4 GEMMs, the
// residual in the last one's epilogue); float32/float16 input keeps an fp32 iterate
// and the residual update X - W P is one fused pass reading the bf16 GEMM output
// (float64 input stays float64 throughout). svd_cap uses
// at::linalg_svd (cuSOLVER) in fp32/fp64: it is the slow exact baseline.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "spectral_cap.h"

namespace lipschitz {
namespace {

constexpr int kThreads = 256;

// out = x + coef[b] * p, x in the state dtype, p in the GEMM dtype.
template <typename S, typename G>
__global__ void axpy_kernel(const S* __restrict__ x, const G* __restrict__ p,
                            const S* __restrict__ coef, int64_t per_matrix, int64_t total,
                            S* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = x[i] + coef[i / per_matrix] * static_cast<S>(p[i]);
  }
}

at::Tensor axpy_cuda(const at::Tensor& X_in, const at::Tensor& P_in, const at::Tensor& coef_in) {
  const at::Tensor X = X_in.contiguous(), P = P_in.contiguous(), coef = coef_in.contiguous();
  TORCH_CHECK(coef.numel() == X.size(0), "spectral cap: internal error (coef/batch mismatch)");
  at::Tensor out = at::empty(X.sizes(), X.options());
  const int64_t total = X.numel(), per = X.size(1) * X.size(2);
  if (total == 0) return out;
  const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (X.scalar_type() == at::kDouble) {
    TORCH_CHECK(P.scalar_type() == at::kDouble, "spectral cap: internal error (dtype)");
    axpy_kernel<double, double><<<blocks, kThreads, 0, stream>>>(
        X.data_ptr<double>(), P.data_ptr<double>(), coef.data_ptr<double>(), per, total,
        out.data_ptr<double>());
  } else {
    TORCH_CHECK(X.scalar_type() == at::kFloat, "spectral cap: internal error (dtype)");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.scalar_type(), "axpy_cuda", [&] {
      axpy_kernel<float, scalar_t><<<blocks, kThreads, 0, stream>>>(
          X.data_ptr<float>(), P.data_ptr<scalar_t>(), coef.data_ptr<float>(), per, total,
          out.data_ptr<float>());
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::ScalarType bf16_or_double(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kBFloat16;
}

// bf16 input stays bf16 (the soft cap is then four GEMMs, the residual fused);
// float32/float16 input keeps an fp32 iterate next to the bf16 GEMM operands.
at::ScalarType cuda_state(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : (t == at::kBFloat16 ? at::kBFloat16 : at::kFloat);
}

const Backend& cuda_cap_backend() {
  static const Backend be{&cuda_state, &bf16_or_double, &axpy_cuda, &rank1_aten};
  return be;
}

at::Tensor spectral_soft_cap_cuda(const at::Tensor& W, double alpha) {
  const c10::cuda::CUDAGuard guard(W.device());
  return soft_cap_impl(cuda_cap_backend(), W, alpha);
}

at::Tensor spectral_soft_cap_per_matrix_cuda(const at::Tensor& W, const at::Tensor& alpha) {
  const c10::cuda::CUDAGuard guard(W.device());
  return soft_cap_per_matrix_impl(cuda_cap_backend(), W, alpha);
}

at::Tensor spectral_hard_cap_cuda(const at::Tensor& W, double sigma_max, c10::string_view method,
                                  int64_t steps, int64_t iters) {
  const c10::cuda::CUDAGuard guard(W.device());
  return hard_cap_impl(cuda_cap_backend(), W, sigma_max, method, steps, iters);
}

// No certificate on CUDA (all false): the wrapper's guard certifies the output there.
std::tuple<at::Tensor, at::Tensor> spectral_hard_cap_eigh_certified_cuda(const at::Tensor& W, double sigma_max,
                                                                          double slack) {
  const c10::cuda::CUDAGuard guard(W.device());
  return hard_cap_eigh_certified_impl(cuda_cap_backend(), W, sigma_max, slack);
}

at::Tensor orthogonal_project_cuda(const at::Tensor& W, double sigma_max, int64_t steps) {
  const c10::cuda::CUDAGuard guard(W.device());
  return orthogonal_project_impl(cuda_cap_backend(), W, sigma_max, steps);
}

at::Tensor svd_cap_cuda(const at::Tensor& W, double sigma_max) {
  const c10::cuda::CUDAGuard guard(W.device());
  return svd_cap_impl(W, sigma_max);
}

}  // namespace

TORCH_LIBRARY_IMPL(lipschitz, CUDA, m) {
  m.impl("spectral_soft_cap", &spectral_soft_cap_cuda);
  m.impl("spectral_soft_cap.per_matrix", &spectral_soft_cap_per_matrix_cuda);
  m.impl("_spectral_hard_cap", &spectral_hard_cap_cuda);
  m.impl("_spectral_hard_cap_eigh_certified", &spectral_hard_cap_eigh_certified_cuda);
  m.impl("orthogonal_project", &orthogonal_project_cuda);
  m.impl("svd_cap", &svd_cap_cuda);
}

}  // namespace lipschitz
