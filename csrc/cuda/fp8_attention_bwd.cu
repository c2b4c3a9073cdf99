// CUDA backward of lipschitz::fp8_attention (fp8_attention_bwd): the dispatch to
// PyTorch's FlashAttention-2 backward (by default after a bf16 recompute of exact
// statistics), cuDNN's SDPA backward, or the ATen math, by the op's `kernel`
// argument (csrc/fp8_attention.h, choose_bwd_path).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "fp8_attention.h"

namespace lipschitz {
namespace {

// The gradient in bf16 by PyTorch's FlashAttention-2 backward (sm_80+), fed with
// the given (out, lse) or, by default, with exact ones from its bf16 forward:
// the fp8 forward's own statistics put fp8-sized errors into D = rowsum(dO * out)
// and P = exp(S - lse); the recompute keeps the gradient at bf16 accuracy.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_backward(const at::Tensor& go, const at::Tensor& qc,
                                                              const at::Tensor& kc, const at::Tensor& vc,
                                                              const std::optional<at::Tensor>& out,
                                                              const std::optional<at::Tensor>& lse, bool causal,
                                                              double softmax_scale) {
  const int64_t N = qc.size(2);
  if (out.has_value()) {
    // Dropout is off, so the RNG state tensors are never read.
    const auto longs = qc.options().dtype(at::kLong);
    return at::_scaled_dot_product_flash_attention_backward(go, qc, kc, vc, out->contiguous(), lse->contiguous(),
                                                            at::Tensor(), at::Tensor(), N, N, 0.0, causal,
                                                            at::zeros({}, longs), at::zeros({}, longs),
                                                            softmax_scale);
  }
  const auto fwd = at::_scaled_dot_product_flash_attention(qc, kc, vc, 0.0, causal, false, softmax_scale);
  return at::_scaled_dot_product_flash_attention_backward(
      go, qc, kc, vc, std::get<0>(fwd), std::get<1>(fwd), std::get<2>(fwd), std::get<3>(fwd), N, N, 0.0, causal,
      std::get<6>(fwd), std::get<7>(fwd), softmax_scale);
}

// The same gradient by cuDNN's SDPA backward. Its layout requirements (to be
// confirmed on a GPU, docs/kernels.md): q, k, v, out and dO dense [B, H, N, d]
// with one stride order (all contiguous here), the statistics float32
// [B, H, N, 1] natural-log log-sum-exp, which is FlashAttention's [B, H, N]
// with a unit dim appended.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cudnn_backward(const at::Tensor& go, const at::Tensor& qc,
                                                              const at::Tensor& kc, const at::Tensor& vc,
                                                              const std::optional<at::Tensor>& out,
                                                              const std::optional<at::Tensor>& lse, bool causal,
                                                              double softmax_scale) {
  const int64_t N = qc.size(2);
  const auto longs = qc.options().dtype(at::kLong);
  at::Tensor o, stats, seed = at::zeros({}, longs), offset = at::zeros({}, longs);
  if (out.has_value()) {
    o = out->contiguous();
    stats = lse->unsqueeze(-1).contiguous();
  } else {
    auto fwd = at::_scaled_dot_product_cudnn_attention(qc, kc, vc, std::nullopt, /*compute_log_sumexp=*/true,
                                                       0.0, causal, false, softmax_scale);
    o = std::get<0>(fwd).contiguous();
    stats = std::get<1>(fwd);
    seed = std::get<6>(fwd);
    offset = std::get<7>(fwd);
  }
  return at::_scaled_dot_product_cudnn_attention_backward(go, qc, kc, vc, o, stats, seed, offset,
                                                          /*attn_bias=*/at::Tensor(), at::Tensor(), at::Tensor(),
                                                          N, N, 0.0, causal, softmax_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& lse, bool causal,
    double softmax_scale, c10::string_view kernel) {
  fp8attn::check_bwd_args(grad_out, q, k, v, out, lse, softmax_scale, "fp8_attention_bwd");
  const fp8attn::BwdSetting setting = fp8attn::resolve_bwd_kernel(kernel, "fp8_attention_bwd", "kernel");
  const c10::cuda::CUDAGuard guard(q.device());
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  const auto& hooks = at::detail::getCUDAHooks();
  const int64_t cudnn_version = hooks.compiledWithCuDNN() ? hooks.versionCuDNN() : 0;
  const fp8attn::BwdPath path = fp8attn::choose_bwd_path(setting, major, cudnn_version,
                                                         at::globalContext().userEnabledCuDNNSDP(),
                                                         q.size(0) * q.size(1) == 0);
  if (path == fp8attn::BwdPath::kMath) {
    return fp8attn::backward_math(grad_out, q, k, v, out, lse, causal, softmax_scale);
  }
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), go = grad_out.contiguous();
  if (path == fp8attn::BwdPath::kCudnn) {
    try {
      return cudnn_backward(go, qc, kc, vc, out, lse, causal, softmax_scale);
    } catch (const c10::Error& e) {
      // cuDNN refuses some configurations only when it builds its graph: keep training on FA2.
      fp8attn::cudnn_fallbacks.fetch_add(1);
      TORCH_WARN_ONCE("fp8_attention_bwd: cuDNN's SDPA backward failed (", e.what_without_backtrace(),
                      "); using FlashAttention-2 instead");
    }
  }
  return flash_backward(go, qc, kc, vc, out, lse, causal, softmax_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(lipschitz, CUDA, m) {
  m.impl("fp8_attention_bwd", &fp8_attention_bwd_cuda);
}

}  // namespace lipschitz
