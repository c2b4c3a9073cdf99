// Tile enumeration of the batched symmetric Newton-Schulz kernels
// (csrc/cuda/ns_symmetric.cu): which output tile one thread block computes, and
// where it lies in the batched buffer. Plain integer math, compiled for the host
// (the CPU debug op lipschitz::triangle_tiles, csrc/triangle_tiles.cpp, tests it)
// and for the device (the kernels decode their block index with the same code).
//
// A batch of B symmetric n x n products is cut into square tiles of side `tile`;
// nt = ceil(n / tile) per side. Only the upper triangle of tiles (row <= col) is
// computed: nt (nt + 1) / 2 tiles per matrix, enumerated row by row:
//   t = 0 .. nt-1       -> (0, 0) .. (0, nt-1)
//   t = nt .. 2 nt - 2  -> (1, 1) .. (1, nt-1)   ...
// One launch covers the batch: block index = b * tiles_per_matrix + t. The block
// of an off-diagonal tile also writes the transposed (mirror) tile; a diagonal
// tile writes element (i, j) for i <= j and mirrors i < j, so every element of
// the n x n result is written exactly once from one computed value (the result
// is exactly symmetric). Rectangular products (X' = a X + B X) enumerate all
// mt x nt tiles row-major.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LIPSCHITZ_HD __host__ __device__ __forceinline__
#else
#define LIPSCHITZ_HD inline
#endif

namespace lipschitz {
namespace tiles {

// A CUDA grid holds at most 2^31 - 1 blocks in x.
constexpr int64_t kMaxBlocks = (int64_t{1} << 31) - 1;

// ceil(n / tile), n >= 0, tile >= 1.
LIPSCHITZ_HD int64_t tiles_per_side(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

// Upper-triangle tiles (diagonal included) of an nt x nt tile grid.
LIPSCHITZ_HD int64_t upper_tile_count(int64_t nt) { return nt * (nt + 1) / 2; }

// Index of the first tile of tile-row r in the row-by-row upper enumeration:
// rows 0 .. r-1 hold nt, nt-1, ..., nt-r+1 tiles.
LIPSCHITZ_HD int64_t upper_row_start(int64_t r, int64_t nt) { return r * nt - r * (r - 1) / 2; }

// t in [0, upper_tile_count(nt)) -> (row, col) with row <= col. A linear scan
// over tile rows (nt is at most a few hundred): exact integer math, no sqrt.
LIPSCHITZ_HD void upper_tile(int64_t t, int64_t nt, int64_t* row, int64_t* col) {
  int64_t r = 0, start = 0;
  while (t >= start + (nt - r)) {
    start += nt - r;
    ++r;
  }
  *row = r;
  *col = r + (t - start);
}

// Element offset of matrix b in a contiguous batched [B, rows, cols] buffer.
LIPSCHITZ_HD int64_t matrix_offset(int64_t b, int64_t rows, int64_t cols) { return b * rows * cols; }

// Element offset of tile (row, col)'s first element in matrix b of a contiguous
// [B, rows, cols] buffer.
LIPSCHITZ_HD int64_t tile_offset(int64_t b, int64_t row, int64_t col, int64_t rows, int64_t cols,
                                 int64_t tile) {
  return matrix_offset(b, rows, cols) + row * tile * cols + col * tile;
}

// batch * tiles_per_matrix blocks, or -1 when that is not a valid 1-D grid
// (more than 2^31 - 1 blocks; checked without overflowing int64).
inline int64_t grid_blocks(int64_t batch, int64_t tiles_per_matrix) {
  if (batch < 0 || tiles_per_matrix < 0) return -1;
  if (tiles_per_matrix != 0 && batch > kMaxBlocks / tiles_per_matrix) return -1;
  return batch * tiles_per_matrix;
}

}  // namespace tiles
}  // namespace lipschitz
