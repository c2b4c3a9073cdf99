// CUDA kernels of lipschitz::fp8_attention.
//
// sm_90a (H100/H200, when this file was compiled for sm_90a): a pre-pass
// quantizes q and k to e4m3 ([BH, N, d] bytes) and writes V^T in e4m3
// ([BH, d, Npad], keys permuted within each 32-key chunk, see vt_position), then
// one CTA of one warpgroup (128 threads) takes 64 query rows and walks the key
// tiles of 128 (double-buffered cp.async loads into 128B-swizzled shared memory):
//   S = Q K^T         wgmma m64n128k32 e4m3 x e4m3 -> f32, both from shared memory
//   online softmax    float32 registers, exp2 domain, tile-wise rescaling
//   O += P V          wgmma m64n{d}k32, P from registers (e4m3 of p * 2^8), V^T from shared memory
// The arithmetic is the one csrc/fp8_attention.h specifies (and emulates).
// e4m3 inputs (already quantized by the caller, e.g. in its projections) skip the
// q/k pre-pass and only get V^T's byte transpose.
// Other GPUs: that ATen emulation. Backward: PyTorch's FlashAttention backward
// (by default after a bf16 recompute of exact statistics), or cuDNN's SDPA
// backward when LIPSCHITZ_FP8_ATTN_BWD=cudnn (csrc/fp8_attention.h, choose_bwd_path).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <array>
#include <mutex>

#include "fp8_attention.h"
#include "wgmma_fp8.cuh"

namespace lipschitz {
namespace {

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

int launch_blocks(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, int64_t{1} << 20));
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

std::tuple<at::Tensor, at::Tensor> fp8_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, bool causal, double softmax_scale,
                                                          double q_scale, double k_scale, double v_scale,
                                                          c10::string_view backward) {
  fp8attn::check_fwd_args(q, k, v, softmax_scale, q_scale, k_scale, v_scale, backward, "fp8_attention");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3), BH = B * H;
  if (BH == 0 || !has_sm90a(q.get_device())) {
    return fp8attn::forward_emulated(q, k, v, causal, softmax_scale, q_scale, k_scale, v_scale);
  }
  TORCH_CHECK(N < (int64_t{1} << 30), "fp8_attention: sequence length too large: ", N);
  const fp8attn::Constants c = fp8attn::constants(softmax_scale, q_scale, k_scale, v_scale);
  // Dense rows with the base aligned to `align` bytes: the bf16 pre-pass reads
  // pairs as 32-bit words; the kernel's cp.async reads e4m3 q, k rows in 16 bytes.
  auto dense = [](const at::Tensor& t, uintptr_t align) {
    at::Tensor c = t.contiguous();
    return reinterpret_cast<uintptr_t>(c.data_ptr()) % align == 0 ? c : c.clone();
  };
  const int64_t Npad = (N + kBlockN - 1) / kBlockN * kBlockN;
  const auto bytes = q.options().dtype(at::kByte);
  at::Tensor vt8 = at::empty({BH, d, Npad}, bytes);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
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
  at::Tensor out = at::empty({B, H, N, d}, q.options().dtype(at::kBFloat16));
  at::Tensor lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  if (d == 64) {
    launch_fwd_sm90<64>(q8, k8, vt8, out, lse, BH, static_cast<int>(N), static_cast<int>(Npad), c.score,
                        c.out, causal, stream);
  } else {
    launch_fwd_sm90<128>(q8, k8, vt8, out, lse, BH, static_cast<int>(N), static_cast<int>(Npad), c.score,
                         c.out, causal, stream);
  }
  return {out, lse};
}

// The gradient in bf16 by PyTorch's FlashAttention-2 backward (sm_80+), fed with
// the given (out, lse) or, by default, with exact ones from its bf16 forward:
// the fp8 forward's own statistics put fp8-sized errors into D = rowsum(dO * out)
// and P = exp(S - lse); the recompute keeps the gradient at bf16 accuracy.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_backward(const at::Tensor& go, const at::Tensor& qc,
                                                              const at::Tensor& kc, const at::Tensor& vc,
                                                              const std::optional<at::Tensor>& out,
                                                              const std::optional<at::Tensor>& lse, bool causal,
                                                              double softmax_scale) {
  const int64_t N = qc.size(2);
  if (out.has_value()) {
    // Dropout is off, so the RNG state tensors are never read.
    const auto longs = qc.options().dtype(at::kLong);
    return at::_scaled_dot_product_flash_attention_backward(go, qc, kc, vc, out->contiguous(), lse->contiguous(),
                                                            at::Tensor(), at::Tensor(), N, N, 0.0, causal,
                                                            at::zeros({}, longs), at::zeros({}, longs),
                                                            softmax_scale);
  }
  const auto fwd = at::_scaled_dot_product_flash_attention(qc, kc, vc, 0.0, causal, false, softmax_scale);
  return at::_scaled_dot_product_flash_attention_backward(
      go, qc, kc, vc, std::get<0>(fwd), std::get<1>(fwd), std::get<2>(fwd), std::get<3>(fwd), N, N, 0.0, causal,
      std::get<6>(fwd), std::get<7>(fwd), softmax_scale);
}

// The same gradient by cuDNN's SDPA backward. Its layout requirements (to be
// confirmed on a GPU, docs/kernels.md): q, k, v, out and dO dense [B, H, N, d]
// with one stride order (all contiguous here), the statistics float32
// [B, H, N, 1] natural-log log-sum-exp, which is FlashAttention's [B, H, N]
// with a unit dim appended.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cudnn_backward(const at::Tensor& go, const at::Tensor& qc,
                                                              const at::Tensor& kc, const at::Tensor& vc,
                                                              const std::optional<at::Tensor>& out,
                                                              const std::optional<at::Tensor>& lse, bool causal,
                                                              double softmax_scale) {
  const int64_t N = qc.size(2);
  const auto longs = qc.options().dtype(at::kLong);
  at::Tensor o, stats, seed = at::zeros({}, longs), offset = at::zeros({}, longs);
  if (out.has_value()) {
    o = out->contiguous();
    stats = lse->unsqueeze(-1).contiguous();
  } else {
    auto fwd = at::_scaled_dot_product_cudnn_attention(qc, kc, vc, std::nullopt, /*compute_log_sumexp=*/true,
                                                       0.0, causal, false, softmax_scale);
    o = std::get<0>(fwd).contiguous();
    stats = std::get<1>(fwd);
    seed = std::get<6>(fwd);
    offset = std::get<7>(fwd);
  }
  return at::_scaled_dot_product_cudnn_attention_backward(go, qc, kc, vc, o, stats, seed, offset,
                                                          /*attn_bias=*/at::Tensor(), at::Tensor(), at::Tensor(),
                                                          N, N, 0.0, causal, softmax_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& lse, bool causal,
    double softmax_scale) {
  fp8attn::check_bwd_args(grad_out, q, k, v, out, lse, softmax_scale, "fp8_attention_bwd");
  const fp8attn::BwdSetting setting = fp8attn::bwd_setting_from_env();
  const c10::cuda::CUDAGuard guard(q.device());
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  const auto& hooks = at::detail::getCUDAHooks();
  const int64_t cudnn_version = hooks.compiledWithCuDNN() ? hooks.versionCuDNN() : 0;
  const fp8attn::BwdPath path = fp8attn::choose_bwd_path(setting, major, cudnn_version,
                                                         at::globalContext().userEnabledCuDNNSDP(),
                                                         q.size(0) * q.size(1) == 0);
  if (path == fp8attn::BwdPath::kMath) {
    return fp8attn::backward_math(grad_out, q, k, v, out, lse, causal, softmax_scale);
  }
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), go = grad_out.contiguous();
  if (path == fp8attn::BwdPath::kCudnn) {
    try {
      return cudnn_backward(go, qc, kc, vc, out, lse, causal, softmax_scale);
    } catch (const c10::Error& e) {
      // cuDNN refuses some configurations only when it builds its graph: keep training on FA2.
      fp8attn::cudnn_fallbacks.fetch_add(1);
      TORCH_WARN_ONCE("fp8_attention_bwd: cuDNN's SDPA backward failed (", e.what_without_backtrace(),
                      "); using FlashAttention-2 instead");
    }
  }
  return flash_backward(go, qc, kc, vc, out, lse, causal, softmax_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(lipschitz, CUDA, m) {
  m.impl("fp8_attention_fwd", &fp8_attention_fwd_cuda);
  m.impl("fp8_attention_bwd", &fp8_attention_bwd_cuda);
}

}  // namespace lipschitz
