// CUDA-event interval timer for the benchmark loop (see timer.h). Host code
// only: CUDA runtime events on torch's current stream, no kernels.
#include <cuda_runtime_api.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "timer.h"

namespace lipschitz::bench {
namespace {

// Owns the events so an exception from the body (a Python error) cannot leak them.
struct EventPool {
  std::vector<cudaEvent_t> events;
  explicit EventPool(int64_t n) {
    events.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      cudaEvent_t e = nullptr;
      C10_CUDA_CHECK(cudaEventCreate(&e));
      events.push_back(e);
    }
  }
  ~EventPool() {
    for (cudaEvent_t e : events) cudaEventDestroy(e);
  }
  EventPool(const EventPool&) = delete;
  EventPool& operator=(const EventPool&) = delete;
};

void record_on_current_stream(cudaEvent_t e, int device_index) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device_index).stream();
  C10_CUDA_CHECK(cudaEventRecord(e, stream));
}

}  // namespace

void cuda_synchronize(int device_index) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  C10_CUDA_CHECK(cudaDeviceSynchronize());
}

std::vector<double> cuda_time_intervals(int device_index, int64_t n,
                                        const std::function<void(int64_t)>& body) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  // Interval i runs from event i to event i + 1: back-to-back calls share one boundary.
  EventPool pool(n + 1);
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  record_on_current_stream(pool.events[0], device_index);
  for (int64_t i = 0; i < n; ++i) {
    body(i);
    record_on_current_stream(pool.events[i + 1], device_index);
  }
  C10_CUDA_CHECK(cudaEventSynchronize(pool.events[n]));
  std::vector<double> ms(n);
  for (int64_t i = 0; i < n; ++i) {
    float t = 0.0f;
    C10_CUDA_CHECK(cudaEventElapsedTime(&t, pool.events[i], pool.events[i + 1]));
    ms[i] = static_cast<double>(t);
  }
  return ms;
}

}  // namespace lipschitz::bench
