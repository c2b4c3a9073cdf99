// CUDA forward of lipschitz::fp8_attention (fp8_attention_fwd): on sm_90a
// (H100/H200, when this file was compiled for sm_90a) the pre-pass
// (csrc/cuda/fp8_attention_prepass.cu) and the wgmma kernel
// (csrc/cuda/fp8_attention_mainloop.cuh); e4m3 inputs (already quantized by the
// caller, e.g. in its projections) skip the q/k quantization and only get V^T's
// byte transpose. Other GPUs: the ATen emulation of csrc/fp8_attention.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <mutex>

#include "fp8_attention.h"
#include "fp8_attention_mainloop.cuh"
#include "fp8_attention_sm90.cuh"

namespace lipschitz {
namespace fp8attn_sm90 {
namespace {

// Whether this binary holds sm_90a code for `device` (a compute 9.0 GPU and a
// build with the 9.0a target); probed once per device by a one-thread kernel.
__global__ void sm90a_probe_kernel(int* flag) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *flag = 1;
#else
  *flag = 0;
#endif
}

bool has_sm90a(int device) {
  static std::mutex mu;
  static std::array<int, 64> cache = {};  // 0 unknown, 1 yes, 2 no
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= static_cast<int>(cache.size())) return false;
  if (cache[device] == 0) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    bool yes = false;
    if (major == 9 && minor == 0) {
      at::Tensor flag = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device));
      sm90a_probe_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream(device)>>>(flag.data_ptr<int>());
      // No sm_90 image in the binary: not an error for the caller, just no fast path.
      yes = cudaGetLastError() == cudaSuccess && flag.item<int>() == 1;
    }
    cache[device] = yes ? 1 : 2;
  }
  return cache[device] == 1;
}

template <int D>
void launch_fwd_sm90(const at::Tensor& q8, const at::Tensor& k8, const at::Tensor& vt8, at::Tensor& out,
                     at::Tensor& lse, int64_t BH, int N, int Npad, float c_score, float c_out, bool causal,
                     cudaStream_t stream) {
  constexpr int smem = SmemLayout<D>::kAlloc;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(fp8_attention_fwd_sm90<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int m_blocks = (N + kBlockM - 1) / kBlockM;
  const int64_t grid = BH * m_blocks;
  TORCH_CHECK(grid < (int64_t{1} << 31), "fp8_attention: too many (batch * heads * query blocks): ", grid);
  fp8_attention_fwd_sm90<D><<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(
      q8.data_ptr<uint8_t>(), k8.data_ptr<uint8_t>(), vt8.data_ptr<uint8_t>(),
      reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>()), lse.data_ptr<float>(), N, Npad, m_blocks,
      c_score, c_out, causal);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace fp8attn_sm90

namespace {

std::tuple<at::Tensor, at::Tensor> fp8_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, bool causal, double softmax_scale,
                                                          double q_scale, double k_scale, double v_scale,
                                                          c10::string_view backward,
                                                          c10::string_view backward_kernel) {
  fp8attn::check_fwd_args(q, k, v, softmax_scale, q_scale, k_scale, v_scale, backward, backward_kernel,
                          "fp8_attention");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3), BH = B * H;
  if (BH == 0 || !fp8attn_sm90::has_sm90a(q.get_device())) {
    return fp8attn::forward_emulated(q, k, v, causal, softmax_scale, q_scale, k_scale, v_scale);
  }
  TORCH_CHECK(N < (int64_t{1} << 30), "fp8_attention: sequence length too large: ", N);
  const fp8attn::Constants c = fp8attn::constants(softmax_scale, q_scale, k_scale, v_scale);
  const int64_t Npad = (N + fp8attn_sm90::kBlockN - 1) / fp8attn_sm90::kBlockN * fp8attn_sm90::kBlockN;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const fp8attn_sm90::Operands ops = fp8attn_sm90::prepass(q, k, v, c, Npad, stream);
  at::Tensor out = at::empty({B, H, N, d}, q.options().dtype(at::kBFloat16));
  at::Tensor lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  if (d == 64) {
    fp8attn_sm90::launch_fwd_sm90<64>(ops.q8, ops.k8, ops.vt8, out, lse, BH, static_cast<int>(N),
                                      static_cast<int>(Npad), c.score, c.out, causal, stream);
  } else {
    fp8attn_sm90::launch_fwd_sm90<128>(ops.q8, ops.k8, ops.vt8, out, lse, BH, static_cast<int>(N),
                                       static_cast<int>(Npad), c.score, c.out, causal, stream);
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(lipschitz, CUDA, m) {
  m.impl("fp8_attention_fwd", &fp8_attention_fwd_cuda);
}

}  // namespace lipschitz
