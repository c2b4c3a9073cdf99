// Device timers for the benchmark loop (lipschitz_ext._bench). The loop itself
// (calling Python, rotating inputs) lives in bench_module.cpp; this header is
// the seam to the CUDA-event timer in cuda_timer.cu, which is compiled only
// when torch has CUDA (LIPSCHITZ_WITH_CUDA) and by the CUDA compile check.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace lipschitz::bench {

#ifdef LIPSCHITZ_WITH_CUDA
// Waits for all work queued on `device_index`.
void cuda_synchronize(int device_index);

// Runs body(i) for i = 0..n-1 back to back and returns the device time of each
// call in ms, measured by CUDA events recorded on the device's current stream
// before and after each call. The device is synchronized before the first event
// (so earlier work is not counted) and the host waits for the last event only
// at the end, so the host never stalls between intervals: a launch-bound body
// shows up as its real issue rate, a GPU-bound one as its kernel time.
std::vector<double> cuda_time_intervals(int device_index, int64_t n,
                                        const std::function<void(int64_t)>& body);
#endif

}  // namespace lipschitz::bench
