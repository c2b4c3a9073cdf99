// The `lipschitz` op library: every op's schema, in one place. Kernels are
// registered per dispatch key beside their implementations (csrc/cpu/*.cpp,
// csrc/cuda/*.cu); fake (meta) kernels live in lipschitz_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

// An empty Python module: importing lipschitz_ext._C loads this shared library,
// which runs the static TORCH_LIBRARY registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "lipschitz_ext C++/CUDA ops (torch.ops.lipschitz)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(lipschitz, m) {
  // Muon's msign by Newton-Schulz; see csrc/cpu/orthogonalize.cpp.
  m.def(
      "orthogonalize(Tensor G, int steps=5, str coefficients=\"polar_express\", "
      "float[] custom=[], float eps=1e-07) -> Tensor");
  // The composite scalar polynomial of those steps, elementwise (no
  // normalization): s -> p(s). For update-norm bounds (p_max) and tests.
  m.def(
      "ns_polynomial(Tensor s, int steps=5, str coefficients=\"polar_express\", "
      "float[] custom=[]) -> Tensor");
}
