// Symmetric, copy-free Newton-Schulz for lipschitz::orthogonalize on CUDA
// (backend="symmetric"; the cuBLAS path of orthogonalize.cu stays the
// default and the reference). Per step, for the wide orientation (tall inputs use
// X^T X and X (a I + B) on the same buffers, read transposed, never copied):
//   A  = X X^T             upper-triangle tiles only, each stored and mirrored
//   B  = b A + c A A       likewise (A symmetric), b A added in the epilogue
//   X' = a X + B X         all tiles, into the other X buffer (buffers swap)
// Normalization is one pass over G: per-matrix sum of squares, and the factor
// 1 / (||G||_F * norm_scale + eps) computed once by the last block of each matrix.
// A bf16 G is never rewritten: the first step's loads multiply by the factor and
// round to bf16, exactly what a materialized bf16(G * factor) would hold. Other
// dtypes are scaled and cast to bf16 in one more pass.
//
// One kernel computes every product: a 64 x 64 output tile per thread block
// (4 warps, each 32 x 32 = 2 x 2 wmma 16x16x16 bf16 fragments, fp32
// accumulation), K in slices of 32 staged in shared memory, zero-padded at the
// matrix edges (any m, n). Operands are read in their stored orientation; wmma's
// row_major / col_major fragment layouts do the transposes. Every output is
// rounded to bf16 once, as in the cuBLAS path. The tile <-> block map is
// csrc/triangle_tiles.h (tested on the CPU through lipschitz::triangle_tiles).
#include <cstdint>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <mma.h>

#include "checks.h"
#include "ns_coefficients.h"
#include "ns_symmetric.h"
#include "sum_squares.cuh"
#include "triangle_tiles.h"

namespace lipschitz {
namespace {

using bf16 = __nv_bfloat16;
namespace wmma = nvcuda::wmma;

constexpr int kTile = 64;    // output tile side
constexpr int kTileK = 32;   // K slice staged per iteration
constexpr int kGemmThreads = 128;  // 4 warps in a 2 x 2 grid of 32 x 32 sub-tiles
constexpr int kPad = 8;      // bf16 row padding: rows stay multiples of 16 bytes (wmma ldm, uint4 stores)
constexpr int kPadC = 4;     // fp32 staging row padding (wmma ldm multiple of 4)
constexpr int kLdc = kTile + kPadC;
// one operand slice: [kTile][kTileK + kPad] or [kTileK][kTile + kPad] bf16
constexpr int kOperandSmem =
    kTile * (kTileK + kPad) > kTileK * (kTile + kPad) ? kTile * (kTileK + kPad) : kTileK * (kTile + kPad);
constexpr int kThreads = 256;  // elementwise kernels

static_assert(kTile == 64 && kGemmThreads == 128, "the warp layout below assumes 2 x 2 warps of 32 x 32");
static_assert(kTileK % 16 == 0 && kTile % 8 == 0, "wmma k-step and 8-element chunks");

// A matrix operand in memory: matrix b starts at ptr + b * batch_stride, its
// stored row r at + r * ld (row-major storage; the kernel's template flags say
// whether the product reads it as is or transposed).
struct Operand {
  const bf16* ptr = nullptr;
  int64_t batch_stride = 0;
  int64_t ld = 0;
  const float* scale = nullptr;  // per-matrix factor applied before rounding to bf16, or null
  bool vec = false;              // 16-byte loads are aligned (see make_operand)
};

// D = alpha * op(a) op(b) + beta * c; op(a) is M x K, op(b) K x N, c and D M x N
// (c.ptr null: no beta term). SYMMETRIC products (M == N, result symmetric)
// compute the upper tiles only.
struct GemmParams {
  Operand a, b, c;
  bf16* d = nullptr;
  int64_t d_batch_stride = 0, ldd = 0;
  int M = 0, N = 0, K = 0;
  float alpha = 1.f, beta = 0.f;
  int64_t tiles_m = 0, tiles_n = 0, tiles_per_matrix = 0;
};

// Copies the ROWS x COLS box at stored (r0, c0) of matrix b into shared memory
// [ROWS][COLS + kPad], zero outside rlim x clim, in 8-element chunks.
template <int ROWS, int COLS>
__device__ __forceinline__ void load_box(bf16* __restrict__ s, const Operand& op, int64_t b, int r0, int c0,
                                         int rlim, int clim) {
  constexpr int kChunks = COLS / 8;
  const bf16* g = op.ptr + b * op.batch_stride;
  const float f = op.scale != nullptr ? op.scale[b] : 1.f;
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += kGemmThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const int gr = r0 + r, gc = c0 + c;
    alignas(16) bf16 v[8];
    if (op.vec && gr < rlim && gc + 8 <= clim) {
      *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(g + gr * op.ld + gc);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e)
        v[e] = (gr < rlim && gc + e < clim) ? g[gr * op.ld + gc + e] : __float2bfloat16(0.f);
    }
    if (op.scale != nullptr) {
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = __float2bfloat16(__bfloat162float(v[e]) * f);
    }
    *reinterpret_cast<uint4*>(s + r * (COLS + kPad) + c) = *reinterpret_cast<const uint4*>(v);
  }
}

// One 64 x 64 output tile per block; block index = batch * tiles_per_matrix + t.
// A_ROW: op(a)(i, k) = a[i * ld + k], else a[k * ld + i].
// B_ROW: op(b)(k, j) = b[k * ld + j], else b[j * ld + k].
template <bool A_ROW, bool B_ROW, bool SYMMETRIC>
__global__ void __launch_bounds__(kGemmThreads) tile_gemm_kernel(const GemmParams p) {
  __shared__ __align__(128) bf16 sA[kOperandSmem];
  __shared__ __align__(128) bf16 sB[kOperandSmem];
  __shared__ __align__(128) float sC[kTile * kLdc];

  const int64_t blk = blockIdx.x;
  const int64_t b = blk / p.tiles_per_matrix, t = blk % p.tiles_per_matrix;
  int64_t tr, tc;
  if constexpr (SYMMETRIC) {
    tiles::upper_tile(t, p.tiles_m, &tr, &tc);
  } else {
    tr = t / p.tiles_n;
    tc = t % p.tiles_n;
  }
  const int row0 = static_cast<int>(tr) * kTile, col0 = static_cast<int>(tc) * kTile;
  const int warp = threadIdx.x / 32;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;

  using LayoutA = std::conditional_t<A_ROW, wmma::row_major, wmma::col_major>;
  using LayoutB = std::conditional_t<B_ROW, wmma::row_major, wmma::col_major>;
  constexpr int kLdA = A_ROW ? kTileK + kPad : kTile + kPad;
  constexpr int kLdB = B_ROW ? kTile + kPad : kTileK + kPad;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int k0 = 0; k0 < p.K; k0 += kTileK) {
    if constexpr (A_ROW) {
      load_box<kTile, kTileK>(sA, p.a, b, row0, k0, p.M, p.K);
    } else {
      load_box<kTileK, kTile>(sA, p.a, b, k0, row0, p.K, p.M);
    }
    if constexpr (B_ROW) {
      load_box<kTileK, kTile>(sB, p.b, b, k0, col0, p.K, p.N);
    } else {
      load_box<kTile, kTileK>(sB, p.b, b, col0, k0, p.N, p.K);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, LayoutA> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, LayoutB> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int ro = wr + 16 * i;
        wmma::load_matrix_sync(fa[i], A_ROW ? sA + ro * kLdA + kk : sA + kk * kLdA + ro, kLdA);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int co = wc + 16 * j;
        wmma::load_matrix_sync(fb[j], B_ROW ? sB + kk * kLdB + co : sB + co * kLdB + kk, kLdB);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(sC + (wr + 16 * i) * kLdc + wc + 16 * j, acc[i][j], kLdc, wmma::mem_row_major);
  __syncthreads();

  // Epilogue, pass 1: D(i, j) = bf16(alpha acc + beta c(i, j)) for the tile (upper
  // half only on a diagonal tile); the rounded value stays in sC for the mirror.
  const bf16* cg = p.c.ptr != nullptr ? p.c.ptr + b * p.c.batch_stride : nullptr;
  const float cf = p.c.scale != nullptr ? p.c.scale[b] : 1.f;
  bf16* dg = p.d + b * p.d_batch_stride;
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += kGemmThreads) {
    const int r = idx / kTile, cc = idx % kTile;
    const int i = row0 + r, j = col0 + cc;
    if (i >= p.M || j >= p.N || (SYMMETRIC && i > j)) continue;
    float v = p.alpha * sC[r * kLdc + cc];
    if (cg != nullptr) {
      bf16 cv = cg[i * p.c.ld + j];
      if (p.c.scale != nullptr) cv = __float2bfloat16(__bfloat162float(cv) * cf);
      v += p.beta * __bfloat162float(cv);
    }
    const bf16 out = __float2bfloat16(v);
    dg[i * p.ldd + j] = out;
    if constexpr (SYMMETRIC) sC[r * kLdc + cc] = __bfloat162float(out);
  }
  if constexpr (SYMMETRIC) {
    // Pass 2: D(j, i) = D(i, j) for i < j; consecutive threads write consecutive
    // columns i of mirror row j.
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += kGemmThreads) {
      const int cc = idx / kTile, r = idx % kTile;
      const int i = row0 + r, j = col0 + cc;
      if (i >= p.M || j >= p.N || i >= j) continue;
      dg[j * p.ldd + i] = __float2bfloat16(sC[r * kLdc + cc]);
    }
  }
}

// One pass over G: grid.x = batch * blocks_per_matrix blocks add their partial
// sums of squares (float64) into sumsq[b]; the last block of matrix b to finish
// turns the total into factor[b] = 1 / (sqrt(sumsq) * norm_scale + eps) (0 for a
// zero matrix even with eps = 0, NaN/0 for non-finite input as in the cuBLAS path).
template <typename T>
__global__ void norm_factor_kernel(const T* __restrict__ x, int64_t per_matrix, int blocks_per_matrix,
                                   double norm_scale, double eps, double* __restrict__ sumsq,
                                   unsigned int* __restrict__ done, float* __restrict__ factor) {
  const int64_t b = blockIdx.x / blocks_per_matrix;
  const double s = lipschitz::block_sum_squares<kThreads>(x, per_matrix, blocks_per_matrix);
  if (threadIdx.x == 0) {
    atomicAdd(sumsq + b, s);
    __threadfence();  // this block's sum is visible before it counts itself done
    if (atomicAdd(done + b, 1u) == static_cast<unsigned int>(blocks_per_matrix - 1)) {
      const double total = atomicAdd(sumsq + b, 0.0);  // read through L2: every part is in
      const double denom = sqrt(total) * norm_scale + eps;
      factor[b] = static_cast<float>(denom == 0.0 ? 0.0 : 1.0 / denom);
    }
  }
}

// y = bf16(float(x) * factor[b]): the normalized bf16 iterate of a non-bf16 G.
template <typename T>
__global__ void scale_to_bf16_kernel(const T* __restrict__ x, int64_t per_matrix, int64_t total,
                                     const float* __restrict__ factor, bf16* __restrict__ y) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16(static_cast<float>(x[i]) * factor[i / per_matrix]);
}

Operand make_operand(const at::Tensor& t, int64_t ld, const float* scale) {
  Operand op;
  op.ptr = reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>());
  op.batch_stride = t.size(1) * t.size(2);
  op.ld = ld;
  op.scale = scale;
  op.vec = ld % 8 == 0 && op.batch_stride % 8 == 0 && reinterpret_cast<uintptr_t>(op.ptr) % 16 == 0;
  return op;
}

template <bool A_ROW, bool B_ROW, bool SYMMETRIC>
void launch_tile_gemm(GemmParams p, at::Tensor& D, int64_t batch, cudaStream_t stream) {
  p.d = reinterpret_cast<bf16*>(D.data_ptr<at::BFloat16>());
  p.d_batch_stride = D.size(1) * D.size(2);
  p.ldd = D.size(2);
  p.tiles_m = tiles::tiles_per_side(p.M, kTile);
  p.tiles_n = tiles::tiles_per_side(p.N, kTile);
  p.tiles_per_matrix = SYMMETRIC ? tiles::upper_tile_count(p.tiles_m) : p.tiles_m * p.tiles_n;
  const int64_t blocks = tiles::grid_blocks(batch, p.tiles_per_matrix);
  TORCH_INTERNAL_ASSERT(blocks > 0, "ns_symmetric: grid checked by the caller");
  tile_gemm_kernel<A_ROW, B_ROW, SYMMETRIC><<<static_cast<unsigned int>(blocks), kGemmThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor orthogonalize_symmetric_cuda(const at::Tensor& G, const NSPlan& plan, double eps) {
  const c10::cuda::CUDAGuard guard(G.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor G3 = as_batch3d(G).contiguous();
  const int64_t batch = G3.size(0), m = G3.size(1), n = G3.size(2);
  const int64_t per_matrix = m * n;
  constexpr int64_t kIntMax = (int64_t{1} << 31) - 1;
  TORCH_CHECK(m <= kIntMax && n <= kIntMax, "orthogonalize: backend='symmetric' takes matrix sides ",
              "below 2^31, got ", m, " x ", n);
  const bool tall = m > n;
  const int64_t s = tall ? n : m;  // side of the Gram matrix
  const int64_t gram_tiles = tiles::upper_tile_count(tiles::tiles_per_side(s, kTile));
  const int64_t update_tiles = tiles::tiles_per_side(m, kTile) * tiles::tiles_per_side(n, kTile);
  TORCH_CHECK(tiles::grid_blocks(batch, gram_tiles) >= 0 && tiles::grid_blocks(batch, update_tiles) >= 0,
              "orthogonalize: a batch of ", batch, " matrices of ", m, " x ", n, " needs more than 2^31 - 1 ",
              "thread blocks in one launch of backend='symmetric'; split the batch or use ",
              "backend='cublas'");

  const auto bf = G.options().dtype(at::kBFloat16);
  // normalization: sumsq (float64) and the done counters share one zeroed buffer
  at::Tensor ws = at::zeros({2 * batch}, G.options().dtype(at::kDouble));
  at::Tensor factor = at::empty({batch}, G.options().dtype(at::kFloat));
  double* sumsq = ws.data_ptr<double>();
  auto* done = reinterpret_cast<unsigned int*>(sumsq + batch);  // batch * 8 bytes, needs batch * 4
  const int blocks_per_matrix = static_cast<int>(std::min<int64_t>(
      (per_matrix + kThreads - 1) / kThreads, std::max<int64_t>(1, 1024 / std::max<int64_t>(batch, 1))));
  TORCH_CHECK(tiles::grid_blocks(batch, blocks_per_matrix) >= 0, "orthogonalize: batch too large");
  const bool fold = G3.scalar_type() == at::kBFloat16;
  at::Tensor X0;  // the bf16 iterate of step 1 (G3 itself when folding: read, never written)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G3.scalar_type(), "orthogonalize_symmetric", [&] {
    norm_factor_kernel<scalar_t>
        <<<static_cast<unsigned int>(batch * blocks_per_matrix), kThreads, 0, stream>>>(
            G3.data_ptr<scalar_t>(), per_matrix, blocks_per_matrix, plan.norm_scale, eps, sumsq, done,
            factor.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!fold) {
      X0 = at::empty(G3.sizes(), bf);
      const int64_t total = batch * per_matrix;
      const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
      scale_to_bf16_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          G3.data_ptr<scalar_t>(), per_matrix, total, factor.data_ptr<float>(),
          reinterpret_cast<bf16*>(X0.data_ptr<at::BFloat16>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (fold) X0 = G3;

  // Two X buffers besides X0 (when folding X0 is the caller's G and must stay
  // untouched, so steps alternate between Xa and Xb; otherwise X0 is reused).
  at::Tensor Xa = at::empty(G3.sizes(), bf);
  at::Tensor Xb = fold ? at::empty(G3.sizes(), bf) : X0;
  at::Tensor A = at::empty({batch, s, s}, bf);
  at::Tensor Bm = at::empty({batch, s, s}, bf);
  const float* x_scale = fold ? factor.data_ptr<float>() : nullptr;

  at::Tensor X = X0, Xnext = Xa;
  for (size_t step = 0; step < plan.coeffs.size(); ++step) {
    const auto& abc = plan.coeffs[step];
    const float* xs = step == 0 ? x_scale : nullptr;
    {  // A = X X^T (wide) or X^T X (tall): both operands are X, ld = n
      GemmParams p;
      p.a = make_operand(X, n, xs);
      p.b = make_operand(X, n, xs);
      p.M = p.N = static_cast<int>(s);
      p.K = static_cast<int>(tall ? m : n);
      if (tall) {
        launch_tile_gemm<false, true, true>(p, A, batch, stream);
      } else {
        launch_tile_gemm<true, false, true>(p, A, batch, stream);
      }
    }
    {  // B = b A + c A A
      GemmParams p;
      p.a = make_operand(A, s, nullptr);
      p.b = make_operand(A, s, nullptr);
      p.c = make_operand(A, s, nullptr);
      p.M = p.N = p.K = static_cast<int>(s);
      p.alpha = static_cast<float>(abc[2]);
      p.beta = static_cast<float>(abc[1]);
      launch_tile_gemm<true, true, true>(p, Bm, batch, stream);
    }
    {  // X' = a X + B X (wide) or a X + X B (tall), into the other buffer
      GemmParams p;
      if (tall) {
        p.a = make_operand(X, n, xs);
        p.b = make_operand(Bm, s, nullptr);
      } else {
        p.a = make_operand(Bm, s, nullptr);
        p.b = make_operand(X, n, xs);
      }
      p.c = make_operand(X, n, xs);
      p.M = static_cast<int>(m);
      p.N = static_cast<int>(n);
      p.K = static_cast<int>(s);
      p.alpha = 1.f;
      p.beta = static_cast<float>(abc[0]);
      launch_tile_gemm<true, true, false>(p, Xnext, batch, stream);
    }
    // swap: the buffer just read becomes the next output (never the caller's G)
    at::Tensor read = X;
    X = Xnext;
    Xnext = (step == 0 && fold) ? Xb : read;
  }
  return X.reshape(G.sizes()).to(G.scalar_type());
}

}  // namespace lipschitz
