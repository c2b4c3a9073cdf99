// Newton-Schulz (msign) coefficient tables, shared by the CPU and CUDA paths.
// Each step maps X -> a X + b (X X^T) X + c (X X^T)^2 X, i.e. singular values
// s -> a s + b s^3 + c s^5. Sources: docs/theory.md, section 3.
#pragma once

#include <array>
#include <string>
#include <string_view>
#include <vector>

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace lipschitz {

using NSTriple = std::array<double, 3>;

// Keller Jordan's Muon default: fast, does not converge to 1 (peaks ~1.2).
inline const std::vector<NSTriple>& ns_jordan() {
  static const std::vector<NSTriple> t = {{3.4445, -4.7750, 2.0315}};
  return t;
}

// "You" 5-step set used by the paper's NanoGPT runs; composite max 1.14502.
inline const std::vector<NSTriple>& ns_you() {
  static const std::vector<NSTriple> t = {{4.0848, -6.8946, 2.9270},
                                          {3.9505, -6.3029, 2.6377},
                                          {3.7418, -5.5913, 2.3037},
                                          {2.8769, -3.1427, 1.2046},
                                          {2.8366, -3.0525, 1.2012}};
  return t;
}

// Jiacheng's 6-step set (the paper's JAX runs), each divided by 1024.
inline const std::vector<NSTriple>& ns_jiacheng() {
  static const std::vector<NSTriple> t = {{3955 / 1024.0, -8306 / 1024.0, 5008 / 1024.0},
                                          {3735 / 1024.0, -6681 / 1024.0, 3463 / 1024.0},
                                          {3799 / 1024.0, -6499 / 1024.0, 3211 / 1024.0},
                                          {4019 / 1024.0, -6385 / 1024.0, 2906 / 1024.0},
                                          {2677 / 1024.0, -3029 / 1024.0, 1162 / 1024.0},
                                          {2172 / 1024.0, -1833 / 1024.0, 682 / 1024.0}};
  return t;
}

// Polar Express (Amsel et al. 2025), per-step minimax optimal; converges to the
// polar factor. Returned WITH the bf16 safety factor applied: every triple except
// the last divided by (1.01, 1.01^3, 1.01^5). The last triple repeats.
inline const std::vector<NSTriple>& ns_polar_express() {
  static const std::vector<NSTriple> t = [] {
    std::vector<NSTriple> raw = {
        {8.28721201814563, -23.595886519098837, 17.300387312530933},
        {4.107059111542203, -2.9478499167379106, 0.5448431082926601},
        {3.9486908534822946, -2.908902115962949, 0.5518191394370137},
        {3.3184196573706015, -2.488488024314874, 0.51004894012372},
        {2.300652019954817, -1.6689039845747493, 0.4188073119525673},
        {1.891301407787398, -1.2679958271945868, 0.37680408948524835},
        {1.8750014808534479, -1.2500016453999487, 0.3750001645474248},
        {1.875, -1.25, 0.375}};
    const double s = 1.01;
    for (size_t i = 0; i + 1 < raw.size(); ++i) {
      raw[i][0] /= s;
      raw[i][1] /= s * s * s;
      raw[i][2] /= s * s * s * s * s;
    }
    return raw;
  }();
  return t;
}

// A resolved plan: exactly `steps` triples, and the Frobenius-norm normalization
// X = G / (||G||_F * norm_scale + eps).
struct NSPlan {
  std::vector<NSTriple> coeffs;
  double norm_scale = 1.0;
};

// `name` is one of jordan / you / jiacheng / polar_express, or "custom" with
// `custom` = flattened (a, b, c) triples. Past the end of a table the last
// triple repeats.
inline NSPlan make_ns_plan(int64_t steps, std::string_view name, c10::ArrayRef<double> custom,
                           const char* op) {
  TORCH_CHECK(steps >= 1, op, ": argument 'steps' must be >= 1, got ", steps);
  TORCH_CHECK(steps <= 100, op, ": argument 'steps' must be <= 100, got ", steps);
  NSPlan plan;
  std::vector<NSTriple> table;
  if (name == "custom") {
    TORCH_CHECK(!custom.empty(), op,
                ": argument 'coefficients' is an empty list; give at least one (a, b, c) triple");
    TORCH_CHECK(custom.size() % 3 == 0, op,
                ": argument 'coefficients' must be (a, b, c) triples, got ", custom.size(),
                " numbers");
    for (size_t i = 0; i < custom.size(); i += 3) {
      for (size_t j = 0; j < 3; ++j)
        TORCH_CHECK(std::isfinite(custom[i + j]), op,
                    ": argument 'coefficients' holds a non-finite value");
      table.push_back({custom[i], custom[i + 1], custom[i + 2]});
    }
  } else if (name == "jordan") {
    table = ns_jordan();
  } else if (name == "you") {
    table = ns_you();
  } else if (name == "jiacheng") {
    table = ns_jiacheng();
  } else if (name == "polar_express") {
    table = ns_polar_express();
    plan.norm_scale = 1.01;
  } else {
    TORCH_CHECK(false, op, ": argument 'coefficients' must be one of 'jordan', 'you', ",
                "'jiacheng', 'polar_express' or a list of (a, b, c) triples, got '",
                std::string(name), "'");
  }
  plan.coeffs.reserve(steps);
  for (int64_t i = 0; i < steps; ++i)
    plan.coeffs.push_back(table[std::min<size_t>(i, table.size() - 1)]);
  return plan;
}

}  // namespace lipschitz
