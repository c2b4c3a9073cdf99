// The sm_90a fp8_attention forward kernel (csrc/cuda/fp8_attention_sm90.cuh): one
// CTA of one warpgroup (128 threads) takes 64 query rows and walks the key tiles
// of 128 (double-buffered cp.async loads into 128B-swizzled shared memory):
//   S = Q K^T         wgmma m64n128k32 e4m3 x e4m3 -> f32, both from shared memory
//   online softmax    float32 registers, exp2 domain, tile-wise rescaling
//   O += P V          wgmma m64n{d}k32, P from registers (e4m3 of p * 2^8), V^T from shared memory
// Included by csrc/cuda/fp8_attention_launch.cu only.
#pragma once

#include <cuda_bf16.h>

#include "fp8_attention_sm90.cuh"
#include "wgmma_fp8.cuh"

namespace lipschitz {
namespace fp8attn_sm90 {

template <int D>
struct SmemLayout {
  // Q at offset 0: 64 rows x 128 B.
  static constexpr int kK = kBlockM * 128;              // 2 x (128 keys x 128 B)
  static constexpr int kV = kK + 2 * kBlockN * 128;     // 2 x (D rows x 128 B of keys)
  static constexpr int kVStage = D * 128;
  static constexpr int kBytes = kV + 2 * kVStage;
  static constexpr int kAlloc = kBytes + 1024;          // room to align the base to 1024
};

template <int D>
__global__ void __launch_bounds__(kThreads, 1)
    fp8_attention_fwd_sm90(const uint8_t* __restrict__ q8, const uint8_t* __restrict__ k8,
                           const uint8_t* __restrict__ vt8, __nv_bfloat16* __restrict__ out,
                           float* __restrict__ lse, int N, int Npad, int m_blocks, float c_score,
                           float c_out, bool causal) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = SmemLayout<D>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t base = (raw + 1023u) & ~1023u;
  const uint32_t sQ = base;
  // Stage `buf` of K / V^T (computed, not indexed: a run-time index into a
  // register array would put it on the stack).
  auto sK = [&](int buf) { return base + L::kK + static_cast<uint32_t>(buf) * (kBlockN * 128); };
  auto sV = [&](int buf) { return base + L::kV + static_cast<uint32_t>(buf) * L::kVStage; };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  // Heaviest (last, under causal) query blocks first.
  const int m_block = m_blocks - 1 - static_cast<int>(blockIdx.x % m_blocks);
  const int64_t bh = blockIdx.x / m_blocks;
  const int m0 = m_block * kBlockM;
  const uint8_t* qh = q8 + bh * N * D;
  const uint8_t* kh = k8 + bh * N * D;
  const uint8_t* vh = vt8 + bh * D * static_cast<int64_t>(Npad);

  const int tiles_all = (N + kBlockN - 1) / kBlockN;
  // 64 | 128: a query block never straddles a key tile, so its last tile is its diagonal's.
  const int tiles = causal ? min(tiles_all, (m0 + kBlockM - 1) / kBlockN + 1) : tiles_all;

  constexpr int kChunks = D / 16;  // 16-byte chunks per q/k row
  auto load_q = [&]() {
#pragma unroll
    for (int i = tid; i < kBlockM * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks, gr = m0 + r;
      sm90::cp_async16(sQ + sm90::swizzle128(r, c), qh + static_cast<int64_t>(min(gr, N - 1)) * D + c * 16,
                       gr < N);
    }
  };
  auto load_kv = [&](int tile, int buf) {
    const int n0 = tile * kBlockN;
#pragma unroll
    for (int i = tid; i < kBlockN * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks, gr = n0 + r;
      sm90::cp_async16(sK(buf) + sm90::swizzle128(r, c),
                       kh + static_cast<int64_t>(min(gr, N - 1)) * D + c * 16, gr < N);
    }
#pragma unroll
    for (int i = tid; i < D * 8; i += kThreads) {
      const int r = i / 8, c = i % 8;
      sm90::cp_async16(sV(buf) + sm90::swizzle128(r, c), vh + static_cast<int64_t>(r) * Npad + n0 + c * 16,
                       true);
    }
  };

  load_q();
  load_kv(0, 0);
  sm90::cp_async_commit();

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  const int row[2] = {m0 + 16 * warp + g, m0 + 16 * warp + g + 8};

  for (int j = 0; j < tiles; ++j) {
    const int buf = j & 1;
    if (j + 1 < tiles) {
      load_kv(j + 1, buf ^ 1);  // that buffer's readers finished before the last barrier
      sm90::cp_async_commit();
      sm90::cp_async_wait<1>();
    } else {
      sm90::cp_async_wait<0>();
    }
    sm90::fence_proxy_async();
    __syncthreads();

    // S = Q K^T over d in k32 steps.
    float s[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) s[i] = 0.0f;
    sm90::fence_operands(s);
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 32; ++kk) {
      sm90::wgmma_ss_m64n128k32(s, sm90::smem_desc(sQ + 32 * kk), sm90::smem_desc(sK(buf) + 32 * kk), kk > 0);
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait_all();
    sm90::fence_operands(s);

    // s[4i + e]: row row[e / 2], key n0 + 8i + 2tq + (e % 2).
    const int n0 = j * kBlockN;
    // Only the tail tile and tiles reaching past the block's first row need masks.
    const bool masked = n0 + kBlockN > N || (causal && n0 + kBlockN - 1 > m0);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < 16; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + 8 * i + 2 * tq + (e & 1);
        const bool valid = !masked || (key < N && (!causal || key <= row[e >> 1]));
        const float t = valid ? s[4 * i + e] * c_score : -INFINITY;
        s[4 * i + e] = t;
        mx[e >> 1] = fmaxf(mx[e >> 1], t);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m_run[r], mx[r]);  // finite: key 0 is visible to every row
      alpha[r] = exp2f(m_run[r] - m_new);
      m_run[r] = m_new;
    }
    float rs[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      const float p = exp2f(s[i] - m_run[(i >> 1) & 1]);
      s[i] = p;
      rs[(i >> 1) & 1] += p;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + rs[r];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];

    // P (times 2^8, <= 256 < 448) as e4m3 A fragments, one per 32-key chunk.
    constexpr float kP = static_cast<float>(fp8attn::kPScale);
    uint32_t a[4][4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float* p = s + 16 * c;
      a[c][0] = sm90::e4m3x4(p[0] * kP, p[1] * kP, p[4] * kP, p[5] * kP);
      a[c][1] = sm90::e4m3x4(p[2] * kP, p[3] * kP, p[6] * kP, p[7] * kP);
      a[c][2] = sm90::e4m3x4(p[8] * kP, p[9] * kP, p[12] * kP, p[13] * kP);
      a[c][3] = sm90::e4m3x4(p[10] * kP, p[11] * kP, p[14] * kP, p[15] * kP);
    }
    sm90::fence_operands(o);
    sm90::wgmma_fence();
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if constexpr (D == 128) {
        sm90::wgmma_rs_m64n128k32(o, a[c], sm90::smem_desc(sV(buf) + 32 * c));
      } else {
        sm90::wgmma_rs_m64n64k32(o, a[c], sm90::smem_desc(sV(buf) + 32 * c));
      }
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait_all();
    sm90::fence_operands(o);
    __syncthreads();  // every thread is done with this tile's buffers
  }

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    inv[r] = c_out / l_run[r];
  }
  __nv_bfloat16* oh = out + bh * N * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= N) continue;
    __nv_bfloat16* orow = oh + static_cast<int64_t>(row[r]) * D;
#pragma unroll
    for (int x = 0; x < D / 8; ++x) {
      const __nv_bfloat162 val = __floats2bfloat162_rn(o[4 * x + 2 * r] * inv[r], o[4 * x + 2 * r + 1] * inv[r]);
      *reinterpret_cast<__nv_bfloat162*>(orow + 8 * x + 2 * tq) = val;
    }
    if (tq == 0) {
      lse[bh * N + row[r]] = (m_run[r] + log2f(l_run[r])) * static_cast<float>(fp8attn::kLn2);
    }
  }
#endif
}

}  // namespace fp8attn_sm90
}  // namespace lipschitz
