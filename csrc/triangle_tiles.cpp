// Host-side debug ops of the symmetric Newton-Schulz kernels, for the CPU tests
// (python_tests/test_triangle_tiles.py): the tile list the kernels decode from
// their block index (csrc/triangle_tiles.h, the same code), and the backend
// orthogonalize's backend="default" resolves to. Schemas in
// csrc/lipschitz_internal.cpp; neither takes a tensor: one kernel for every device.
#include <torch/library.h>

#include "ns_symmetric.h"
#include "triangle_tiles.h"

namespace lipschitz {
namespace {

// [count, 5] int64 rows (batch, row_tile, col_tile, offset, mirror_offset):
// symmetric=True lists the upper-triangle tiles of a batch of n x n products,
// symmetric=False all tiles of a batch of n x m ones (m = n when m < 0), in
// block-index order. offset / mirror_offset: element offset of the tile's first
// element / of its transpose's in the contiguous batched buffer (mirror_offset
// -1 for rectangular tiles).
at::Tensor triangle_tiles(int64_t n, int64_t tile, int64_t batch, bool symmetric, int64_t m) {
  TORCH_CHECK(n >= 1, "triangle_tiles: argument 'n' must be >= 1, got ", n);
  TORCH_CHECK(tile >= 1, "triangle_tiles: argument 'tile' must be >= 1, got ", tile);
  TORCH_CHECK(batch >= 1, "triangle_tiles: argument 'batch' must be >= 1, got ", batch);
  const int64_t cols = m < 0 ? n : m;
  TORCH_CHECK(!symmetric || cols == n, "triangle_tiles: a symmetric product is square; got m = ", m,
              " != n = ", n);
  const int64_t nt_rows = tiles::tiles_per_side(n, tile), nt_cols = tiles::tiles_per_side(cols, tile);
  const int64_t per_matrix = symmetric ? tiles::upper_tile_count(nt_rows) : nt_rows * nt_cols;
  const int64_t blocks = tiles::grid_blocks(batch, per_matrix);
  TORCH_CHECK(blocks >= 0, "triangle_tiles: batch ", batch, " x ", per_matrix,
              " tiles per matrix exceeds the 2^31 - 1 blocks of one CUDA launch");
  // a debug op: refuse lists too large to inspect rather than allocate gigabytes
  TORCH_CHECK(blocks <= (int64_t{1} << 24), "triangle_tiles: ", blocks,
              " tiles is more than this debug op lists (2^24)");
  at::Tensor out = at::empty({blocks, 5}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = out.data_ptr<int64_t>();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t b = blk / per_matrix, t = blk % per_matrix;
    int64_t r, c;
    if (symmetric) {
      tiles::upper_tile(t, nt_rows, &r, &c);
    } else {
      r = t / nt_cols;
      c = t % nt_cols;
    }
    p[0] = b;
    p[1] = r;
    p[2] = c;
    p[3] = tiles::tile_offset(b, r, c, n, cols, tile);
    p[4] = symmetric ? tiles::tile_offset(b, c, r, n, cols, tile) : -1;
    p += 5;
  }
  return out;
}

std::string ns_backend() { return ns_backend_name(ns_backend_from_env()); }

}  // namespace

TORCH_LIBRARY_IMPL(lipschitz_internal, CompositeImplicitAutograd, m) {
  m.impl("triangle_tiles", &triangle_tiles);
  m.impl("ns_backend", &ns_backend);
}

}  // namespace lipschitz
