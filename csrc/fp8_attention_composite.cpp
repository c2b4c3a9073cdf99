// lipschitz::fp8_attention, the public op on every device: resolves the default
// softmax scale and calls lipschitz::fp8_attention_fwd through the dispatcher, so
// the device kernels (csrc/cpu/fp8_attention.cpp, csrc/cuda/fp8_attention_*.cu) and
// the autograd formula registered in lipschitz_ext/ops/fp8_attention.py apply.
// Also the backward-kernel selection, as lipschitz_internal ops the tests and
// benchmarks query (schemas in csrc/lipschitz_internal.cpp).
#include <optional>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "fp8_attention.h"

namespace lipschitz {
namespace {

// The public op: defaults resolved, then the differentiable forward.
at::Tensor fp8_attention_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   bool causal, std::optional<double> softmax_scale, double q_scale,
                                   double k_scale, double v_scale, c10::string_view backward,
                                   c10::string_view backward_kernel) {
  TORCH_CHECK(q.defined() && q.dim() == 4, "fp8_attention: argument 'q' must have rank 4 (shape [B, H, N, d]), got ",
              q.defined() ? q.sizes() : at::IntArrayRef{});
  const double scale = softmax_scale.value_or(1.0 / static_cast<double>(q.size(3)));
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("lipschitz::fp8_attention_fwd", "")
                        .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, bool, double, double,
                                                                  double, double, c10::string_view,
                                                                  c10::string_view)>();
  return std::get<0>(fwd.call(q, k, v, causal, scale, q_scale, k_scale, v_scale, backward, backward_kernel));
}

// The kernel backward_kernel="default" resolves to now (LIPSCHITZ_FP8_ATTN_BWD).
std::string fp8_attention_bwd_setting() { return fp8attn::bwd_setting_name(fp8attn::bwd_setting_from_env()); }

// The kernel fp8_attention_bwd runs for this request and device ("math", "flash", "cudnn").
std::string fp8_attention_bwd_path(c10::string_view kernel, int64_t compute_major, int64_t cudnn_version,
                                   bool cudnn_sdp_enabled, bool empty) {
  const fp8attn::BwdSetting setting = fp8attn::resolve_bwd_kernel(kernel, "fp8_attention_bwd_path", "backward_kernel");
  return fp8attn::bwd_path_name(
      fp8attn::choose_bwd_path(setting, compute_major, cudnn_version, cudnn_sdp_enabled, empty));
}

int64_t fp8_attention_bwd_cudnn_fallbacks() { return fp8attn::cudnn_fallbacks.load(); }

}  // namespace

TORCH_LIBRARY_IMPL(lipschitz_internal, CompositeImplicitAutograd, m) {
  m.impl("fp8_attention_bwd_setting", &fp8_attention_bwd_setting);
  m.impl("fp8_attention_bwd_cudnn_fallbacks", &fp8_attention_bwd_cudnn_fallbacks);
  m.impl("fp8_attention_bwd_path", &fp8_attention_bwd_path);
}

TORCH_LIBRARY_IMPL(lipschitz, CompositeImplicitAutograd, m) {
  m.impl("fp8_attention", &fp8_attention_composite);
}

}  // namespace lipschitz
