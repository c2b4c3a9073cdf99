// lipschitz::fp8_attention: argument checks and the device-generic ATen
// implementation shared by the CPU kernel and the CUDA fallback (GPUs without
// sm_90a wgmma). The Hopper kernel (csrc/cuda/fp8_attention_*.cu) performs the
// same arithmetic; this file is its specification.
//
// Forward, per batch-head, for q, k, v bf16 [N, d]:
//   q8 = e4m3(clamp(q * (1/q_scale), +-448))     (likewise k8, v8; the product is
//        a float32 multiply by the float32 reciprocal, rounded to nearest even)
// q, k, v may instead all be float8_e4m3fn, already quantized (q = q8 * q_scale):
// then q8, k8, v8 are the inputs themselves and the rest is unchanged, so
// quantizing bf16 inputs by the rule above and passing the e4m3 tensors with the
// same scales gives the same result bit for bit.
//   t  = (q8 k8^T) * c,  c = float32(q_scale * k_scale * softmax_scale * log2(e))
//   masked (causal j > i, or j >= N) entries of t are -inf
//   keys are taken in tiles of kKeyTile = 128 (tile starts 0, 128, ...); per tile:
//     m' = max(m, rowmax(t_tile));  alpha = exp2(m - m');  p = exp2(t_tile - m')
//     l  = l * alpha + rowsum(p)                   (p in float32, in [0, 1])
//     acc = acc * alpha + e4m3(p * 256) v8         (p*256 <= 256 < 448: no saturation)
//   out = bf16(acc * (float32(v_scale / 256) / l)),  lse = (m + log2(l)) * ln(2)
// The rescaling by alpha is tile-wise, so a P entry's fp8 rounding depends on the
// running max of its tile: the emulation must use the kernel's tile size.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "checks.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <limits>
#include <optional>
#include <tuple>

namespace lipschitz {
namespace fp8attn {

constexpr int64_t kKeyTile = 128;
constexpr double kE4M3Max = 448.0;
// P in [0, 1] is scaled by 2^8 before its fp8 cast (and divided back in the end).
constexpr double kPScale = 256.0;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  const at::Tensor* ts[3] = {&q, &k, &v};
  const char* names[3] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *ts[i];
    TORCH_CHECK(t.defined(), op, ": argument '", names[i], "' is undefined");
    TORCH_CHECK(t.dim() == 4, op, ": argument '", names[i],
                "' must have rank 4 (shape [B, H, N, d]), got shape ", t.sizes());
    if (i == 0) {
      TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat8_e4m3fn, op,
                  ": argument 'q' must be bfloat16 or float8_e4m3fn (already quantized, with its static "
                  "q_scale), got ", t.scalar_type());
    } else {
      TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": argument '", names[i], "' must be ",
                  q.scalar_type() == at::kBFloat16 ? "bfloat16" : "float8_e4m3fn", " like 'q', got ",
                  t.scalar_type());
    }
    TORCH_CHECK(t.layout() == at::kStrided, op, ": argument '", names[i], "' must be a dense tensor");
    TORCH_CHECK(t.device() == q.device(), op, ": argument '", names[i], "' is on ", t.device(),
                " but 'q' is on ", q.device());
  }
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op,
              ": arguments 'q', 'k', 'v' must have the same shape [B, H, N, d], got ", q.sizes(),
              ", ", k.sizes(), ", ", v.sizes());
  const int64_t d = q.size(3);
  TORCH_CHECK(d == 64 || d == 128, op, ": head dim (last dim of 'q') must be 64 or 128, got ", d);
  TORCH_CHECK(q.size(2) >= 1, op, ": sequence length (dim 2 of 'q') must be >= 1");
}

inline void check_scale(double s, const char* op, const char* arg) {
  TORCH_CHECK(std::isfinite(s) && s > 0.0, op, ": argument '", arg, "' must be finite and > 0, got ", s);
}

// Which kernel computes fp8_attention_bwd: its `kernel` argument (fp8_attention's
// `backward_kernel`, saved by the autograd formula). "math": the ATen math below;
// "flash": PyTorch's FlashAttention-2 backward; "cudnn": cuDNN's SDPA backward
// where it is available, FlashAttention-2 elsewhere; "default": the environment
// variable LIPSCHITZ_FP8_ATTN_BWD (same names), read at every call, "flash" when
// unset or empty. Without a GPU of compute capability >= 8 (or on empty input)
// the math runs whatever the request; the CPU takes "default" and "math" only.
enum class BwdSetting { kMath, kFlash, kCudnn };
enum class BwdPath { kMath, kFlash, kCudnn };
// cuDNN's fused SDPA backward, as PyTorch calls it, needs cuDNN 9 (version 90000+).
constexpr long kMinCudnnSdpaVersion = 90000;

inline std::optional<BwdSetting> bwd_setting_of_name(c10::string_view value) {
  if (value == "math") return BwdSetting::kMath;
  if (value == "flash") return BwdSetting::kFlash;
  if (value == "cudnn") return BwdSetting::kCudnn;
  return std::nullopt;
}

// Anything but the three names is refused: a typo must not benchmark the wrong path.
inline BwdSetting bwd_setting_from_env() {
  const char* v = std::getenv("LIPSCHITZ_FP8_ATTN_BWD");
  if (v == nullptr || *v == '\0') return BwdSetting::kFlash;
  const std::optional<BwdSetting> s = bwd_setting_of_name(v);
  TORCH_CHECK(s.has_value(), "environment variable LIPSCHITZ_FP8_ATTN_BWD must be 'flash', 'cudnn' or 'math', got '",
              std::string(v), "'");
  return *s;
}

// The kernel argument `arg` of `op`, checked on every device; "default" resolves
// to the environment's setting (only where it is used: on a CUDA device).
inline std::optional<BwdSetting> parse_bwd_kernel(c10::string_view value, const char* op, const char* arg) {
  if (value == "default") return std::nullopt;
  const std::optional<BwdSetting> s = bwd_setting_of_name(value);
  TORCH_CHECK(s.has_value(), op, ": argument '", arg, "' must be 'default', 'math', 'flash' or 'cudnn', got '",
              std::string(value), "'");
  return s;
}

// The CPU implements the math only.
inline void check_bwd_kernel_cpu(c10::string_view value, const char* op, const char* arg) {
  const std::optional<BwdSetting> s = parse_bwd_kernel(value, op, arg);
  TORCH_CHECK(!s.has_value() || *s == BwdSetting::kMath, op, ": argument '", arg,
              "' must be 'default' or 'math' on CPU (the ATen backward), got '", std::string(value), "'");
}

inline BwdSetting resolve_bwd_kernel(c10::string_view value, const char* op, const char* arg) {
  const std::optional<BwdSetting> s = parse_bwd_kernel(value, op, arg);
  return s.has_value() ? *s : bwd_setting_from_env();
}

inline const char* bwd_setting_name(BwdSetting s) {
  return s == BwdSetting::kCudnn ? "cudnn" : (s == BwdSetting::kFlash ? "flash" : "math");
}

inline const char* bwd_path_name(BwdPath p) {
  return p == BwdPath::kCudnn ? "cudnn" : (p == BwdPath::kFlash ? "flash" : "math");
}

inline void check_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           double softmax_scale, double q_scale, double k_scale, double v_scale,
                           c10::string_view backward, c10::string_view backward_kernel, const char* op) {
  check_qkv(q, k, v, op);
  TORCH_CHECK(backward == "exact" || backward == "saved", op,
              ": argument 'backward' must be \"exact\" or \"saved\", got \"", backward, "\"");
  if (q.device().is_cpu()) {
    check_bwd_kernel_cpu(backward_kernel, op, "backward_kernel");
  } else {
    parse_bwd_kernel(backward_kernel, op, "backward_kernel");
  }
  check_scale(softmax_scale, op, "softmax_scale");
  check_scale(q_scale, op, "q_scale");
  check_scale(k_scale, op, "k_scale");
  check_scale(v_scale, op, "v_scale");
}

// The float32 constants both implementations use, rounded once from double.
struct Constants {
  float inv_q, inv_k, inv_v;  // quantization multipliers 1/scale
  float score;                // c: fp8 dot product -> log2-domain logit
  float out;                  // v_scale / 256
};

inline Constants constants(double softmax_scale, double q_scale, double k_scale, double v_scale) {
  return {static_cast<float>(1.0 / q_scale), static_cast<float>(1.0 / k_scale),
          static_cast<float>(1.0 / v_scale),
          static_cast<float>(q_scale * k_scale * softmax_scale * kLog2e),
          static_cast<float>(v_scale / kPScale)};
}

inline bool is_fp8(const at::Tensor& t) { return t.scalar_type() == at::kFloat8_e4m3fn; }

// e4m3 values of x * inv (float32 product, clamped, round-to-nearest-even), as
// float32; an e4m3 x is already quantized and only widened.
inline at::Tensor quantize_e4m3(const at::Tensor& x, float inv) {
  if (is_fp8(x)) return x.to(at::kFloat);
  return x.to(at::kFloat)
      .mul(static_cast<double>(inv))
      .clamp(-kE4M3Max, kE4M3Max)
      .to(at::kFloat8_e4m3fn)
      .to(at::kFloat);
}

// Flattened [B*H, N, d] view/copy of a [B, H, N, d] tensor.
inline at::Tensor flat_heads(const at::Tensor& t) {
  return t.reshape({t.size(0) * t.size(1), t.size(2), t.size(3)});
}

// The fp8 forward emulated with ATen ops (CPU kernel, and CUDA fallback).
// q, k, v: all bf16, or all e4m3 (quantized with these scales).
// Returns (out bf16 [B, H, N, d], lse float32 [B, H, N]).
inline std::tuple<at::Tensor, at::Tensor> forward_emulated(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, bool causal,
                                                           double softmax_scale, double q_scale,
                                                           double k_scale, double v_scale) {
  const NoAutocast no_autocast;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
  const Constants c = constants(softmax_scale, q_scale, k_scale, v_scale);
  const auto fopts = q.options().dtype(at::kFloat);
  if (B * H == 0) return {at::empty(q.sizes(), q.options().dtype(at::kBFloat16)), at::empty({B, H, N}, fopts)};
  const at::Tensor q8 = quantize_e4m3(flat_heads(q), c.inv_q);
  const at::Tensor k8 = quantize_e4m3(flat_heads(k), c.inv_k);
  const at::Tensor v8 = quantize_e4m3(flat_heads(v), c.inv_v);
  const double neg_inf = -std::numeric_limits<double>::infinity();
  at::Tensor m = at::full({B * H, N, 1}, neg_inf, fopts);
  at::Tensor l = at::zeros({B * H, N, 1}, fopts);
  at::Tensor acc = at::zeros({B * H, N, d}, fopts);
  const at::Tensor rows = at::arange(N, q.options().dtype(at::kLong)).unsqueeze(1);
  for (int64_t n0 = 0; n0 < N; n0 += kKeyTile) {
    const int64_t n1 = std::min(N, n0 + kKeyTile);
    at::Tensor t = at::bmm(q8, k8.slice(1, n0, n1).transpose(1, 2)).mul_(static_cast<double>(c.score));
    if (causal) {
      const at::Tensor cols = at::arange(n0, n1, rows.options()).unsqueeze(0);
      t.masked_fill_(cols > rows, neg_inf);
    }
    const at::Tensor m_new = at::maximum(m, std::get<0>(t.max(-1, /*keepdim=*/true)));
    const at::Tensor alpha = at::exp2(m - m_new);
    const at::Tensor p = at::exp2(t - m_new);
    l = l.mul(alpha).add_(p.sum(-1, /*keepdim=*/true));
    const at::Tensor p8 = p.mul(kPScale).to(at::kFloat8_e4m3fn).to(at::kFloat);
    acc = acc.mul(alpha).add_(at::bmm(p8, v8.slice(1, n0, n1)));
    m = m_new;
  }
  // acc * (out / l) with the quotient rounded first, as the kernel does.
  const at::Tensor inv_l = at::full_like(l, static_cast<double>(c.out)).div_(l);
  at::Tensor out = acc.mul(inv_l).to(at::kBFloat16).reshape({B, H, N, d});
  at::Tensor lse = m.add(at::log2(l)).mul_(kLn2).reshape({B, H, N});
  return {out, lse};
}

inline void check_bwd_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const std::optional<at::Tensor>& out,
                           const std::optional<at::Tensor>& lse, double softmax_scale, const char* op) {
  check_qkv(q, k, v, op);
  TORCH_CHECK(!is_fp8(q), op, ": arguments 'q', 'k', 'v' must be bfloat16: the gradient is taken at the "
              "bf16 values (straight-through for the quantization), not at e4m3 inputs");
  check_scale(softmax_scale, op, "softmax_scale");
  TORCH_CHECK(grad_out.defined() && grad_out.sizes() == q.sizes() && grad_out.device() == q.device(),
              op, ": argument 'grad_out' must match q's shape and device, got ",
              grad_out.defined() ? grad_out.sizes() : at::IntArrayRef{});
  TORCH_CHECK(out.has_value() == lse.has_value(), op, ": pass both 'out' and 'lse' or neither");
  if (out.has_value()) {
    TORCH_CHECK(out->sizes() == q.sizes() && out->device() == q.device(), op,
                ": argument 'out' must match q's shape and device, got ", out->sizes());
    TORCH_CHECK(lse->dim() == 3 && lse->size(0) == q.size(0) && lse->size(1) == q.size(1) &&
                    lse->size(2) == q.size(2) && lse->scalar_type() == at::kFloat && lse->device() == q.device(),
                op, ": argument 'lse' must be float32 [B, H, N] on q's device, got ", lse->sizes(), " ",
                lse->scalar_type());
  }
}

// Backward calls that fell back from cuDNN to FlashAttention-2 in this process
// (fp8_attention_bwd_cudnn_fallbacks); the warning is printed once only.
inline std::atomic<int64_t> cudnn_fallbacks{0};

// compute_major: the GPU's compute capability major (0 for the CPU);
// cudnn_version: cudnnGetVersion() of the loaded cuDNN (0 when torch has none);
// cudnn_sdp_enabled: torch.backends.cuda.cudnn_sdp_enabled(). A cuDNN call that
// still fails at run time falls back to FlashAttention-2 (csrc/cuda/fp8_attention_bwd.cu).
inline BwdPath choose_bwd_path(BwdSetting setting, int64_t compute_major, int64_t cudnn_version,
                               bool cudnn_sdp_enabled, bool empty) {
  if (empty || compute_major < 8 || setting == BwdSetting::kMath) return BwdPath::kMath;
  if (setting == BwdSetting::kCudnn && cudnn_sdp_enabled && cudnn_version >= kMinCudnnSdpaVersion) {
    return BwdPath::kCudnn;
  }
  return BwdPath::kFlash;
}

// Gradient of softmax attention at the bf16 (q, k, v), in float32 with results
// in q's dtype, chunked over query rows so memory stays bounded:
//   P = exp(scale * q k^T - lse), D = rowsum(dO * out), dV = P^T dO,
//   dS = P * (dO v^T - D), dQ = scale * dS k, dK = scale * dS^T q.
// Without (out, lse), each chunk (whole score rows) supplies the exact ones,
// P = softmax(scale * q k^T) and out = P v: exact attention's gradient. With
// them, FlashAttention's backward arithmetic on those statistics.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_math(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& lse, bool causal,
    double softmax_scale) {
  const NoAutocast no_autocast;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3), BH = B * H;
  if (BH == 0) return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v)};
  const at::Tensor qf = flat_heads(q).to(at::kFloat), kf = flat_heads(k).to(at::kFloat);
  const at::Tensor vf = flat_heads(v).to(at::kFloat), dof = flat_heads(grad_out).to(at::kFloat);
  const bool saved = out.has_value();
  at::Tensor saved_delta, saved_lse;
  if (saved) {
    saved_delta = (dof * flat_heads(*out).to(at::kFloat)).sum(-1, /*keepdim=*/true);
    saved_lse = lse->reshape({BH, N, 1}).to(at::kFloat);
  }
  at::Tensor dq = at::empty_like(qf), dk = at::zeros_like(kf), dv = at::zeros_like(vf);
  // ~64 Mi float32 entries of [chunk, N] scores per step.
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, (int64_t{1} << 26) / (BH * N)));
  const at::Tensor cols = at::arange(N, q.options().dtype(at::kLong)).unsqueeze(0);
  for (int64_t i0 = 0; i0 < N; i0 += chunk) {
    const int64_t i1 = std::min(N, i0 + chunk);
    const at::Tensor qc = qf.slice(1, i0, i1), doc = dof.slice(1, i0, i1);
    at::Tensor s = at::bmm(qc, kf.transpose(1, 2)).mul_(softmax_scale);
    if (causal) {
      const at::Tensor rows = at::arange(i0, i1, cols.options()).unsqueeze(1);
      s.masked_fill_(cols > rows, -std::numeric_limits<double>::infinity());
    }
    at::Tensor p, delta;
    if (saved) {
      p = at::exp(s.sub_(saved_lse.slice(1, i0, i1)));
      delta = saved_delta.slice(1, i0, i1);
    } else {
      p = at::softmax(s, -1);
      delta = (doc * at::bmm(p, vf)).sum(-1, /*keepdim=*/true);
    }
    dv.baddbmm_(p.transpose(1, 2), doc);
    const at::Tensor ds = p.mul(at::bmm(doc, vf.transpose(1, 2)).sub_(delta));
    dq.slice(1, i0, i1).copy_(at::bmm(ds, kf).mul_(softmax_scale));
    dk.baddbmm_(ds.transpose(1, 2), qc, /*beta=*/1.0, /*alpha=*/softmax_scale);
  }
  auto back = [&](const at::Tensor& g) { return g.to(q.scalar_type()).reshape({B, H, N, d}); };
  return {back(dq), back(dk), back(dv)};
}

}  // namespace fp8attn
}  // namespace lipschitz
