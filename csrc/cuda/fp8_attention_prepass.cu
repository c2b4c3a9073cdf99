// Pre-pass of the sm_90a fp8_attention forward (csrc/cuda/fp8_attention_sm90.cuh):
// bf16 q, k -> e4m3 bytes; v -> e4m3 V^T [BH, d, Npad], keys permuted within each
// 32-key chunk (vt_key_of_position) so the kernel's P registers are V's A operand.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fp8_attention_sm90.cuh"
#include "wgmma_fp8.cuh"

namespace lipschitz {
namespace fp8attn_sm90 {
namespace {

[[maybe_unused]] __device__ __forceinline__ float bf16_bits_to_float(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

// q, k: [BH, N, d] bf16 -> e4m3 bytes of x * inv, two per thread.
__global__ void quantize_kernel(const uint16_t* __restrict__ x, uint16_t* __restrict__ y, int64_t pairs,
                                float inv) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t two = reinterpret_cast<const uint32_t*>(x)[i];
    y[i] = static_cast<uint16_t>(sm90::e4m3x2(bf16_bits_to_float(two & 0xFFFF) * inv,
                                               bf16_bits_to_float(two >> 16) * inv));
  }
#endif
}

// v: [BH, N, d] -> vt: [BH, d, Npad] e4m3 bytes, keys permuted per 32-key chunk
// (vt_key_of_position), zero past N. Four bytes per thread. kE4M3: v is already
// e4m3 (a byte copy); otherwise bf16, quantized as v * inv.
template <bool kE4M3>
__global__ void transpose_v_kernel(const void* __restrict__ v, uint32_t* __restrict__ vt, int N, int Npad, int d,
                                   int64_t words, float inv) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  const int words_per_row = Npad / 4;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < words;
       w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int pos = static_cast<int>(w % words_per_row) * 4;
    const int64_t row = w / words_per_row;  // bh * d + col
    const int col = static_cast<int>(row % d);
    const int64_t bh = row / d;
    const int chunk0 = pos & ~31;
    int64_t src[4];  // element of v for each byte, -1 past N
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int key = chunk0 + vt_key_of_position((pos & 31) + j);
      src[j] = key < N ? (bh * N + key) * d + col : -1;
    }
    if constexpr (kE4M3) {
      const uint8_t* v8 = static_cast<const uint8_t*>(v);
      uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) word |= (src[j] >= 0 ? uint32_t{v8[src[j]]} : 0u) << (8 * j);
      vt[w] = word;
    } else {
      const uint16_t* vb = static_cast<const uint16_t*>(v);
      float x[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) x[j] = src[j] >= 0 ? bf16_bits_to_float(vb[src[j]]) * inv : 0.0f;
      vt[w] = sm90::e4m3x4(x[0], x[1], x[2], x[3]);
    }
  }
#endif
}

int launch_blocks(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, int64_t{1} << 20));
}

}  // namespace

Operands prepass(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const fp8attn::Constants& c,
                 int64_t Npad, cudaStream_t stream) {
  const int64_t BH = q.size(0) * q.size(1), N = q.size(2), d = q.size(3);
  // Dense rows with the base aligned to `align` bytes: the bf16 pre-pass reads
  // pairs as 32-bit words; the kernel's cp.async reads e4m3 q, k rows in 16 bytes.
  auto dense = [](const at::Tensor& t, uintptr_t align) {
    at::Tensor c = t.contiguous();
    return reinterpret_cast<uintptr_t>(c.data_ptr()) % align == 0 ? c : c.clone();
  };
  const auto bytes = q.options().dtype(at::kByte);
  at::Tensor vt8 = at::empty({BH, d, Npad}, bytes);
  const int64_t pairs = BH * N * d / 2, words = BH * d * Npad / 4;
  at::Tensor q8, k8;
  if (fp8attn::is_fp8(q)) {
    q8 = dense(q, 16).view(at::kByte).reshape({BH, N, d});
    k8 = dense(k, 16).view(at::kByte).reshape({BH, N, d});
    const at::Tensor v8 = v.contiguous().view(at::kByte);
    transpose_v_kernel<true><<<launch_blocks(words, 256), 256, 0, stream>>>(
        v8.data_ptr<uint8_t>(), reinterpret_cast<uint32_t*>(vt8.data_ptr<uint8_t>()), static_cast<int>(N),
        static_cast<int>(Npad), static_cast<int>(d), words, 1.0f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const at::Tensor qc = dense(q, 4), kc = dense(k, 4), vc = dense(v, 4);
    q8 = at::empty({BH, N, d}, bytes);
    k8 = at::empty({BH, N, d}, bytes);
    quantize_kernel<<<launch_blocks(pairs, 256), 256, 0, stream>>>(
        reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>()),
        reinterpret_cast<uint16_t*>(q8.data_ptr<uint8_t>()), pairs, c.inv_q);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    quantize_kernel<<<launch_blocks(pairs, 256), 256, 0, stream>>>(
        reinterpret_cast<const uint16_t*>(kc.data_ptr<at::BFloat16>()),
        reinterpret_cast<uint16_t*>(k8.data_ptr<uint8_t>()), pairs, c.inv_k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    transpose_v_kernel<false><<<launch_blocks(words, 256), 256, 0, stream>>>(
        vc.data_ptr<at::BFloat16>(),
        reinterpret_cast<uint32_t*>(vt8.data_ptr<uint8_t>()), static_cast<int>(N), static_cast<int>(Npad),
        static_cast<int>(d), words, c.inv_v);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {q8, k8, vt8};
}

}  // namespace fp8attn_sm90
}  // namespace lipschitz
