// lipschitz::fp8_attention, the public op on every device: resolves the default
// softmax scale and calls lipschitz::fp8_attention_fwd through the dispatcher, so
// the device kernels (csrc/cpu/fp8_attention.cpp, csrc/cuda/fp8_attention.cu) and
// the autograd formula registered in lipschitz_ext/ops/fp8_attention.py apply.
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace lipschitz {
namespace {

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

TORCH_LIBRARY_IMPL(lipschitz, CompositeImplicitAutograd, m) {
  m.impl("fp8_attention", &fp8_attention_composite);
}

}  // namespace lipschitz
