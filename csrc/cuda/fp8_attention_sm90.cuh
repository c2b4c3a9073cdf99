// The sm_90a forward of lipschitz::fp8_attention, shared by its translation
// units (FlashAttention-3's hopper/ layout, by role):
//   fp8_attention_prepass.cu    q, k -> e4m3; V -> e4m3 V^T with keys permuted
//   fp8_attention_mainloop.cuh  the kernel: one warpgroup, 64 query rows, wgmma
//   fp8_attention_launch.cu     sm_90a probe, launcher, the host op (CUDA forward)
//   fp8_attention_bwd.cu        the backward's dispatch (FlashAttention-2 / cuDNN / math)
// The arithmetic is the one csrc/fp8_attention.h specifies (and emulates).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "fp8_attention.h"

namespace lipschitz {
namespace fp8attn_sm90 {

constexpr int kBlockM = 64;                            // query rows per CTA (one warpgroup)
constexpr int kBlockN = static_cast<int>(fp8attn::kKeyTile);  // keys per tile
constexpr int kThreads = 128;
static_assert(kBlockN == 128, "the kernel's tile walk assumes 128-key tiles");

// Position of key `j` (relative to its 32-key chunk) in V^T's row. The fp8 A
// fragment of wgmma holds, in thread (g, t) byte j of register 0, k-index
// 4t + j; the S accumulator gives that thread keys 2t, 2t+1, 8+2t, 9+2t (and
// +16). Permuting V^T's k order makes P's registers usable as they are:
// k-index 16h + 4t + j holds key 16h + 8*(j/2) + 2t + (j%2).
[[maybe_unused]] __host__ __device__ constexpr int vt_key_of_position(int kappa) {
  return 16 * (kappa / 16) + 8 * ((kappa % 4) / 2) + 2 * ((kappa % 16) / 4) + (kappa % 2);
}

// The kernel's operands, written by the pre-pass: q8, k8 [BH, N, d] e4m3 bytes
// (rows dense, 16-byte aligned), vt8 [BH, d, Npad] (Npad = N rounded up to kBlockN).
struct Operands {
  at::Tensor q8, k8, vt8;
};

// The pre-pass on `stream` (csrc/cuda/fp8_attention_prepass.cu): bf16 q, k, v are
// quantized with c's multipliers; e4m3 q, k are used as they are and e4m3 v is
// only transposed.
Operands prepass(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const fp8attn::Constants& c,
                 int64_t Npad, cudaStream_t stream);

}  // namespace fp8attn_sm90
}  // namespace lipschitz
