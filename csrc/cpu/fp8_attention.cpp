// lipschitz::fp8_attention_fwd / _bwd on CPU: the exact emulation of the fp8
// kernel's rounding (csrc/fp8_attention.h) and the float32 backward (exact
// attention's gradient). The public op is csrc/fp8_attention_composite.cpp.
#include <torch/library.h>

#include "fp8_attention.h"

namespace lipschitz {
namespace {

std::tuple<at::Tensor, at::Tensor> fp8_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, bool causal,
                                                         double softmax_scale, double q_scale,
                                                         double k_scale, double v_scale,
                                                         c10::string_view backward,
                                                         c10::string_view backward_kernel) {
  fp8attn::check_fwd_args(q, k, v, softmax_scale, q_scale, k_scale, v_scale, backward, backward_kernel,
                          "fp8_attention");
  return fp8attn::forward_emulated(q, k, v, causal, softmax_scale, q_scale, k_scale, v_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& lse, bool causal,
    double softmax_scale, c10::string_view kernel) {
  fp8attn::check_bwd_args(grad_out, q, k, v, out, lse, softmax_scale, "fp8_attention_bwd");
  fp8attn::check_bwd_kernel_cpu(kernel, "fp8_attention_bwd", "kernel");
  return fp8attn::backward_math(grad_out, q, k, v, out, lse, causal, softmax_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(lipschitz, CPU, m) {
  m.impl("fp8_attention_fwd", &fp8_attention_fwd_cpu);
  m.impl("fp8_attention_bwd", &fp8_attention_bwd_cpu);
}

}  // namespace lipschitz
