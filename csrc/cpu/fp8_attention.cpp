// lipschitz::fp8_attention on CPU: the exact emulation of the fp8 kernel's
// rounding (csrc/fp8_attention.h), the float32 backward (exact attention's gradient), and the composite
// public op shared by every device.
#include <torch/library.h>

#include "fp8_attention.h"

namespace lipschitz {
namespace {

std::tuple<at::Tensor, at::Tensor> fp8_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, bool causal,
                                                         double softmax_scale, double q_scale,
                                                         double k_scale, double v_scale,
                                                         c10::string_view backward) {
  fp8attn::check_fwd_args(q, k, v, softmax_scale, q_scale, k_scale, v_scale, backward, "fp8_attention");
  return fp8attn::forward_emulated(q, k, v, causal, softmax_scale, q_scale, k_scale, v_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& lse, bool causal,
    double softmax_scale) {
  fp8attn::check_bwd_args(grad_out, q, k, v, out, lse, softmax_scale, "fp8_attention_bwd");
  return fp8attn::backward_math(grad_out, q, k, v, out, lse, causal, softmax_scale);
}

// The public op: defaults resolved, then the differentiable forward.
at::Tensor fp8_attention_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   bool causal, std::optional<double> softmax_scale, double q_scale,
                                   double k_scale, double v_scale, c10::string_view backward) {
  TORCH_CHECK(q.defined() && q.dim() == 4, "fp8_attention: argument 'q' must have rank 4 (shape [B, H, N, d]), got ",
              q.defined() ? q.sizes() : at::IntArrayRef{});
  const double scale = softmax_scale.value_or(1.0 / static_cast<double>(q.size(3)));
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("lipschitz::fp8_attention_fwd", "")
                        .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, bool, double, double,
                                                                  double, double, c10::string_view)>();
  return std::get<0>(fwd.call(q, k, v, causal, scale, q_scale, k_scale, v_scale, backward));
}

}  // namespace

TORCH_LIBRARY_IMPL(lipschitz, CPU, m) {
  m.impl("fp8_attention_fwd", &fp8_attention_fwd_cpu);
  m.impl("fp8_attention_bwd", &fp8_attention_bwd_cpu);
}

TORCH_LIBRARY_IMPL(lipschitz, CompositeImplicitAutograd, m) {
  m.impl("fp8_attention", &fp8_attention_composite);
}

}  // namespace lipschitz
