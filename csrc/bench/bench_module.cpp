// lipschitz_ext._bench: the benchmark timing loop in C++. It calls a Python
// callable (holding the GIL) many times, cycling through several argument sets
// so a small case cannot run out of warm caches, and times each repeat with
// std::chrono::steady_clock on CPU or CUDA events on a GPU (timer.h).
// Only Python objects cross this boundary (no tensors), so the module needs
// pybind11 but not torch_python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "timer.h"

namespace py = pybind11;

namespace lipschitz::bench {
namespace {

// Calls fn(*args[k]) for k cycling over the argument sets.
class RotatingCaller {
 public:
  RotatingCaller(py::object fn, const py::sequence& inputs) : fn_(std::move(fn)) {
    if (!PyCallable_Check(fn_.ptr()))
      throw py::type_error("_bench.time_callable: argument 'fn' must be callable");
    if (py::len(inputs) == 0)
      throw py::value_error("_bench.time_callable: argument 'inputs' must hold at least one argument set");
    for (const py::handle item : inputs) {
      if (!py::isinstance<py::tuple>(item) && !py::isinstance<py::list>(item))
        throw py::type_error(
            "_bench.time_callable: argument 'inputs' must be a sequence of tuples (or lists) of arguments");
      args_.push_back(py::tuple(py::reinterpret_borrow<py::object>(item)));
    }
  }

  void call_next() {
    PyObject* out = PyObject_Call(fn_.ptr(), args_[next_].ptr(), nullptr);
    if (out == nullptr) throw py::error_already_set();
    Py_DECREF(out);  // results are dropped at once, as a training loop would
    next_ = (next_ + 1) % args_.size();
  }

 private:
  py::object fn_;
  std::vector<py::tuple> args_;
  size_t next_ = 0;
};

void check_counts(int64_t warmup, int64_t repeats, int64_t inner) {
  if (warmup < 0) throw py::value_error("_bench.time_callable: argument 'warmup' must be >= 0");
  if (repeats < 1) throw py::value_error("_bench.time_callable: argument 'repeats' must be >= 1");
  if (inner < 1) throw py::value_error("_bench.time_callable: argument 'inner' must be >= 1");
}

std::vector<double> time_callable(py::object fn, const py::sequence& inputs, int64_t warmup,
                                  int64_t repeats, int64_t device_index, int64_t inner) {
  check_counts(warmup, repeats, inner);
  RotatingCaller caller(std::move(fn), inputs);
  std::vector<double> ms;
  if (device_index < 0) {
    for (int64_t i = 0; i < warmup; ++i) caller.call_next();
    ms.reserve(repeats);
    using clock = std::chrono::steady_clock;
    for (int64_t r = 0; r < repeats; ++r) {
      const auto t0 = clock::now();
      for (int64_t j = 0; j < inner; ++j) caller.call_next();
      const auto t1 = clock::now();
      ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count() /
                   static_cast<double>(inner));
    }
    return ms;
  }
#ifdef LIPSCHITZ_WITH_CUDA
  const int dev = static_cast<int>(device_index);
  for (int64_t i = 0; i < warmup; ++i) caller.call_next();
  cuda_synchronize(dev);
  ms = cuda_time_intervals(dev, repeats, [&](int64_t) {
    for (int64_t j = 0; j < inner; ++j) caller.call_next();
  });
  for (double& t : ms) t /= static_cast<double>(inner);
  return ms;
#else
  throw py::value_error(
      "_bench.time_callable: argument 'device_index' names a CUDA device, but lipschitz_ext was "
      "built without CUDA (rebuild against a CUDA torch)");
#endif
}

}  // namespace
}  // namespace lipschitz::bench

PYBIND11_MODULE(_bench, m) {
  m.doc() = "lipschitz_ext benchmark timing loop (used by lipschitz_ext.bench)";
  m.def("time_callable", &lipschitz::bench::time_callable, py::arg("fn"), py::arg("inputs"),
        py::arg("warmup"), py::arg("repeats"), py::arg("device_index") = -1, py::arg("inner") = 1,
        R"doc(Time ``fn(*inputs[k])`` with ``k`` cycling over the argument sets.

Runs ``warmup`` untimed calls, then ``repeats`` timed repeats of ``inner`` calls
each, and returns the milliseconds per call of every repeat (a list of length
``repeats``). ``device_index < 0`` times on the host with a steady clock
(synchronous CPU work); ``device_index >= 0`` times with CUDA events on that
device's current stream (the device is synchronized before timing; work ``fn``
queues on other streams must be joined to the current stream by ``fn``).
The GIL is held throughout; exceptions raised by ``fn`` propagate.)doc");
  m.def(
      "has_cuda",
      []() {
#ifdef LIPSCHITZ_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether this build has the CUDA-event timer.");
}
