// Per-matrix sums of squares in float64, shared by the Frobenius normalizations of
// orthogonalize.cu (cuBLAS path) and ns_symmetric.cu (symmetric path).
#pragma once

#include <cstdint>

#include <cub/block/block_reduce.cuh>

namespace lipschitz {

// The sum of squares of this block's share of matrix blockIdx.x / blocks_per_matrix
// (grid.x = batch * blocks_per_matrix, kThreads threads a block), in float64.
// Every thread calls it; the result is valid in thread 0 only.
template <int kThreads, typename T>
__device__ double block_sum_squares(const T* __restrict__ x, int64_t per_matrix, int blocks_per_matrix) {
  const int64_t b = blockIdx.x / blocks_per_matrix;
  const int64_t part = blockIdx.x % blocks_per_matrix;
  const T* xb = x + b * per_matrix;
  double acc = 0.0;
  for (int64_t i = part * kThreads + threadIdx.x; i < per_matrix;
       i += static_cast<int64_t>(blocks_per_matrix) * kThreads) {
    const double v = static_cast<double>(xb[i]);
    acc += v * v;
  }
  using BlockReduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  return BlockReduce(tmp).Sum(acc);
}

}  // namespace lipschitz
