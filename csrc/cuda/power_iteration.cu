// CUDA kernels of lipschitz::power_iteration and the rank-1 constraints
// (spectral_normalize, spectral_hammer, spectral_weight_decay). The power
// iteration runs in fp32 (float64 for float64) as batched cuBLAS GEMVs
// (csrc/power_iteration.h); the update out = scale * W + coef * u v^T is one
// fused elementwise pass that reads W in its own dtype and writes the result
// in it (no fp32 copy of the output).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "power_iteration.h"

namespace lipschitz {
namespace {

constexpr int kThreads = 256;

template <typename T, typename acc_t>
__global__ void rank1_update_kernel(const T* __restrict__ w, const acc_t* __restrict__ scale,
                                    const acc_t* __restrict__ coef, const acc_t* __restrict__ u,
                                    const acc_t* __restrict__ v, int64_t m, int64_t n,
                                    int64_t total, T* __restrict__ out) {
  const int64_t per = m * n;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / per, r = (i % per) / n, c = i % n;
    const acc_t val =
        scale[b] * static_cast<acc_t>(w[i]) + coef[b] * u[b * m + r] * v[b * n + c];
    out[i] = static_cast<T>(val);
  }
}

at::Tensor rank1_cuda(const at::Tensor& W3_in, const at::Tensor& scale, const at::Tensor& coef,
                      const at::Tensor& u, const at::Tensor& v) {
  const at::Tensor W3 = W3_in.contiguous();
  at::Tensor out = at::empty(W3.sizes(), W3.options());
  const int64_t total = W3.numel();
  const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor sc = scale.contiguous(), co = coef.contiguous(), uu = u.contiguous(),
                   vv = v.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W3.scalar_type(), "rank1_update", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    rank1_update_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        W3.data_ptr<scalar_t>(), sc.data_ptr<acc_t>(), co.data_ptr<acc_t>(), uu.data_ptr<acc_t>(),
        vv.data_ptr<acc_t>(), W3.size(1), W3.size(2), total, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

const Backend& cuda_rank1_backend() {
  static const Backend be{&float_or_double, &float_or_double, &axpy_aten, &rank1_cuda};
  return be;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_cuda(
    const at::Tensor& W, int64_t iters, const std::optional<at::Tensor>& u) {
  const c10::cuda::CUDAGuard guard(W.device());
  return power_iteration_impl(W, iters, u);
}

std::tuple<at::Tensor, at::Tensor> spectral_normalize_cuda(const at::Tensor& W, double sigma_max,
                                                           int64_t iters,
                                                           const std::optional<at::Tensor>& u) {
  const c10::cuda::CUDAGuard guard(W.device());
  return rank1_impl(cuda_rank1_backend(), Rank1Kind::kNormalize, "spectral_normalize", W,
                    sigma_max, iters, u);
}

std::tuple<at::Tensor, at::Tensor> spectral_hammer_cuda(const at::Tensor& W, double sigma_max,
                                                        int64_t iters,
                                                        const std::optional<at::Tensor>& u) {
  const c10::cuda::CUDAGuard guard(W.device());
  return rank1_impl(cuda_rank1_backend(), Rank1Kind::kHammer, "spectral_hammer", W, sigma_max,
                    iters, u);
}

std::tuple<at::Tensor, at::Tensor> spectral_weight_decay_cuda(const at::Tensor& W, double lam,
                                                              int64_t iters,
                                                              const std::optional<at::Tensor>& u) {
  const c10::cuda::CUDAGuard guard(W.device());
  return rank1_impl(cuda_rank1_backend(), Rank1Kind::kWeightDecay, "spectral_weight_decay", W,
                    lam, iters, u);
}

}  // namespace

TORCH_LIBRARY_IMPL(lipschitz, CUDA, m) {
  m.impl("power_iteration", &power_iteration_cuda);
  m.impl("spectral_normalize", &spectral_normalize_cuda);
  m.impl("spectral_hammer", &spectral_hammer_cuda);
  m.impl("spectral_weight_decay", &spectral_weight_decay_cuda);
}

}  // namespace lipschitz
