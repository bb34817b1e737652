// A linear layer on few rows (an eventful step's selected tokens), float32, CPU.
//
// At a few rows a linear layer is bound by reading its weight from memory, and the general
// matrix libraries are several times slower than that here (BENCHMARKS.md, "roofline"). This
// kernel reads the weight once per call from a layout made for it: panels of PANEL output
// columns, each panel (in_features, PANEL) contiguous, so that every loaded vector of weights
// serves up to ROWS rows from registers. Each output element is one sequential sum over the
// input features in the same order whatever the number of rows: a row's result does not depend
// on the rows beside it. Threads share the panels.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "vectors.h"

namespace {

using eventful_vectors::Vector;

constexpr int64_t PANEL = 16;                           // output columns per panel: 2 vectors
constexpr int ROWS = 6;                                 // rows per pass: 12 accumulators
constexpr int64_t GROUP = 2;  // panels that every pass of rows reads while they are in cache

// weight (out, in) -> panels (ceil(out / PANEL), in, PANEL), the missing columns zero.
torch::Tensor pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32,
              "pack expects a float32 (out, in) weight, got ", weight.sizes(), " ",
              weight.scalar_type());
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t panels = (out + PANEL - 1) / PANEL;
  auto padded = torch::zeros({panels * PANEL, in}, weight.options());
  padded.narrow(0, 0, out).copy_(weight);
  return padded.view({panels, PANEL, in}).transpose(1, 2).contiguous();
}

// R rows of x (R, in) times P consecutive panels (each (in, PANEL)) from panel `first_panel`,
// into y's columns from first_panel * PANEL (at most `out`). Passes over fewer rows take more
// panels, so that each keeps enough sums in flight to hide the latency of a multiply-add.
template <int R, int P>
void rows_by_panels(const float* x, int64_t in, const float* panels, int64_t first_panel,
                    const float* bias, float* y, int64_t out) {
  Vector low[R][P], high[R][P];
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < P; ++q) {
      low[r][q] = Vector{};
      high[r][q] = Vector{};
    }
  }
  const float* panel = panels + first_panel * in * PANEL;
  for (int64_t i = 0; i < in; ++i) {
    Vector w_low[P], w_high[P];
    for (int q = 0; q < P; ++q) {
      std::memcpy(&w_low[q], panel + (q * in + i) * PANEL, sizeof(Vector));
      std::memcpy(&w_high[q], panel + (q * in + i) * PANEL + 8, sizeof(Vector));
    }
    for (int r = 0; r < R; ++r) {
      const float value = x[r * in + i];
      for (int q = 0; q < P; ++q) {
        low[r][q] += value * w_low[q];
        high[r][q] += value * w_high[q];
      }
    }
  }
  for (int q = 0; q < P; ++q) {
    const int64_t first = (first_panel + q) * PANEL, width = std::min(PANEL, out - first);
    for (int r = 0; r < R; ++r) {
      float sums[PANEL];
      std::memcpy(sums, &low[r][q], sizeof(Vector));
      std::memcpy(sums + 8, &high[r][q], sizeof(Vector));
      for (int64_t c = 0; c < width; ++c) {
        y[r * out + first + c] = bias == nullptr ? sums[c] : sums[c] + bias[first + c];
      }
    }
  }
}

// R rows times the panels [begin, end), P at a time while P remain, then one at a time.
template <int R, int P>
void rows_by_panel_range(const float* x, int64_t in, const float* panels, int64_t begin,
                         int64_t end, const float* bias, float* y, int64_t out) {
  int64_t p = begin;
  for (; p + P <= end; p += P) rows_by_panels<R, P>(x, in, panels, p, bias, y, out);
  for (; p < end; ++p) rows_by_panels<R, 1>(x, in, panels, p, bias, y, out);
}

// x (rows, in) float32 -> x W^T + bias (rows, out), W given as `pack`'s panels.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& panels,
                     const c10::optional<torch::Tensor>& bias, int64_t out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "linear expects float32 rows");
  TORCH_CHECK(panels.dim() == 3 && panels.size(1) == x.size(1) && panels.size(2) == PANEL &&
                  panels.size(0) * PANEL >= out && panels.is_contiguous(),
              "linear expects the panels of pack() for ", x.size(1), " input features");
  const auto rows_tensor = x.contiguous();
  const int64_t rows = rows_tensor.size(0), in = rows_tensor.size(1);
  auto y = torch::empty({rows, out}, rows_tensor.options());
  const float* xs = rows_tensor.data_ptr<float>();
  const float* ps = panels.data_ptr<float>();
  torch::Tensor bias_tensor;
  const float* bs = nullptr;
  if (bias.has_value() && bias->defined()) {
    bias_tensor = bias->contiguous();
    TORCH_CHECK(bias_tensor.numel() == out, "linear expects a bias of ", out, " values");
    bs = bias_tensor.data_ptr<float>();
  }
  float* ys = y.data_ptr<float>();
  // Panels in groups of GROUP, each group through every pass of rows while it is in cache.
  at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; group += GROUP) {
      const int64_t stop = std::min(group + GROUP, end);
      int64_t r = 0;
      for (; r + ROWS <= rows; r += ROWS) {
        rows_by_panel_range<ROWS, 1>(xs + r * in, in, ps, group, stop, bs, ys + r * out, out);
      }
      for (; r + 2 <= rows; r += 2) {  // 2 rows x 2 panels: 8 sums
        rows_by_panel_range<2, 2>(xs + r * in, in, ps, group, stop, bs, ys + r * out, out);
      }
      if (r < rows) {  // 1 row: bound by reading the panel, however many sums it keeps
        rows_by_panel_range<1, 1>(xs + r * in, in, ps, group, stop, bs, ys + r * out, out);
      }
    }
  });
  return y;
}

}  // namespace

// Operators of the dispatcher (torch.ops.eventful.*), so that profilers and tools see them.
TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def("small_rows_pack(Tensor weight) -> Tensor");
  library.def("small_rows_linear(Tensor x, Tensor panels, Tensor? bias, int out) -> Tensor");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("small_rows_pack", &pack);
  library.impl("small_rows_linear", &linear);
}
