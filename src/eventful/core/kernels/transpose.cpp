// The last two dimensions of a float32 CPU tensor swapped, into new contiguous memory.
//
// A convolutional head's caches hold positions as rows (B H W, C), channels last, while the model
// around it takes (B, C, H, W) in PyTorch's default layout. At a decoder's last stages (64
// channels on 128 x 128 positions) PyTorch's copy of the permuted view takes several times as
// long as reading and writing the memory once. Here blocks of 8 x 8 values go through registers,
// each tile of rows 16 columns (a cache line of each row) at a time, so that every line read is
// used whole and every output row of the tile is written whole. Threads share tiles of rows and
// of columns, so that a few rows of many columns (channels first to channels last) split too.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "vectors.h"

namespace {

constexpr int64_t ROWS_PER_TASK = 64;
constexpr int64_t COLUMNS_PER_TASK = 256;
constexpr int64_t COLUMNS_PER_PASS = 16;  // a cache line of float32

// x (B, R, C), any strides but a contiguous last dimension -> (B, C, R), contiguous.
torch::Tensor transposed(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 3 &&
                  (x.stride(2) == 1 || x.size(2) <= 1),
              "transposed expects a float32 CPU tensor (B, R, C) with a contiguous last "
              "dimension, got ",
              x.scalar_type(), " on ", x.device(), " of shape ", x.sizes(), " with strides ",
              x.strides());
  const int64_t batch = x.size(0), rows = x.size(1), columns = x.size(2);
  auto out = torch::empty({batch, columns, rows}, x.options());
  if (out.numel() == 0) return out;
  const int64_t row_blocks = (rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
  const int64_t column_blocks = (columns + COLUMNS_PER_TASK - 1) / COLUMNS_PER_TASK;
  const int64_t tiles = row_blocks * column_blocks;
  const float* from = x.data_ptr<float>();
  float* to = out.data_ptr<float>();
  const int64_t batch_stride = x.stride(0), row_stride = x.stride(1);
  at::parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, tile = task % tiles;
      const int64_t first = tile / column_blocks * ROWS_PER_TASK;
      const int64_t count = std::min(ROWS_PER_TASK, rows - first);
      const int64_t first_column = tile % column_blocks * COLUMNS_PER_TASK;
      const int64_t last_column = std::min(columns, first_column + COLUMNS_PER_TASK);
      for (int64_t c = first_column; c < last_column; c += COLUMNS_PER_PASS) {
        eventful_vectors::transpose(from + b * batch_stride + first * row_stride + c, row_stride,
                                    count, std::min(COLUMNS_PER_PASS, last_column - c),
                                    to + (b * columns + c) * rows + first, rows);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(eventful, library) { library.def("transposed(Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(eventful, CPU, library) { library.impl("transposed", &transposed); }
