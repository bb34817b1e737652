// A linear layer on few rows (an eventful step's selected tokens), float32 arithmetic, CPU.
//
// At a few rows a linear layer is bound by reading its weight from memory, and the general
// matrix libraries are several times slower than that here (BENCHMARKS.md, "roofline"). This
// kernel reads the weight once per call from a layout made for it: panels of PANEL output
// columns, each panel (in_features, PANEL) contiguous, so that every loaded vector of weights
// serves up to ROWS rows from registers. Each output element is one sequential sum over the
// input features in the same order whatever the number of rows: a row's result does not depend
// on the rows beside it. Threads share the panels.
//
// The panels hold float32 weights, or int8 ones with a scale per output column (precision
// "int8": a quarter of the bytes to read). Int8 weights are widened to float32 as they are
// loaded, so the sums are float32 sums of the same products, and the column's scale multiplies
// each sum once at the end: no instruction beyond AVX2 is needed.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "vectors.h"

namespace {

using eventful_vectors::Vector;
using eventful_vectors::WIDTH;

constexpr int64_t PANEL = 2 * WIDTH;                    // output columns per panel: 2 vectors
// Rows per pass: 2 ROWS accumulators, which with the weights fill most of the vector registers
// (16 with AVX2, 32 with AVX-512).
constexpr int ROWS = WIDTH == 16 ? 12 : 6;
// How far ahead of its loads a pass asks for the weights: at a few rows the passes are bound by
// reading the weights from the last-level cache or memory, and the hardware's own prefetching
// measured 1.5-1.8x slower at 4 and 16 rows (Intel Xeon with AVX-512, 2 threads).
constexpr int64_t PREFETCH_BYTES = 8192;
constexpr int64_t GROUP = 2;  // panels that every pass of rows reads while they are in cache

// weight (out, in) -> panels (ceil(out / PANEL), in, PANEL), the missing columns zero. With a
// scale (out,), the panels are int8: each weight divided by its column's scale, rounded to the
// nearest integer and clamped to [-127, 127].
torch::Tensor pack(const torch::Tensor& weight, const c10::optional<torch::Tensor>& scale) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32,
              "pack expects a float32 (out, in) weight, got ", weight.sizes(), " ",
              weight.scalar_type());
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t panels = (out + PANEL - 1) / PANEL;
  auto padded = torch::zeros({panels * PANEL, in}, weight.options());
  if (scale.has_value() && scale->defined()) {
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == out &&
                    scale->scalar_type() == torch::kFloat32,
                "pack expects a float32 scale of ", out, " values, got ", scale->sizes(), " ",
                scale->scalar_type());
    padded.narrow(0, 0, out)
        .copy_(torch::clamp(torch::round(weight / scale->unsqueeze(1)), -127, 127));
    padded = padded.to(torch::kInt8);
  } else {
    padded.narrow(0, 0, out).copy_(weight);
  }
  return padded.view({panels, PANEL, in}).transpose(1, 2).contiguous();
}

// The WIDTH weights at `at` as floats.
inline Vector load_weights(const float* at) { return eventful_vectors::load(at); }

inline Vector load_weights(const int8_t* at) {
#if defined(__AVX512F__)
  // Sign-extended to 32-bit integers, then converted: two instructions.
  const __m512 widened = _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at))));
  Vector value;
  std::memcpy(&value, &widened, sizeof(Vector));
  return value;
#elif defined(__AVX2__)
  // Sign-extended to 32-bit integers, then converted: two instructions (GCC's generic vector
  // conversion of 8 bytes measured 2-5x slower than float32 weights).
  const __m256 widened = _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at))));
  Vector value;
  std::memcpy(&value, &widened, sizeof(Vector));
  return value;
#else
  typedef int8_t Bytes __attribute__((vector_size(WIDTH)));
  Bytes bytes;
  std::memcpy(&bytes, at, sizeof(Bytes));
  return __builtin_convertvector(bytes, Vector);
#endif
}

// R rows of x (R, in) times P consecutive panels (each (in, PANEL)) from panel `first_panel`,
// into y's columns from first_panel * PANEL (at most `out`), each column's sum times its
// `scale` where one is given. Passes over fewer rows take more panels, so that each keeps enough
// sums in flight to hide the latency of a multiply-add.
template <int R, int P, typename W>
void rows_by_panels(const float* x, int64_t in, const W* panels, int64_t first_panel,
                    const float* scale, const float* bias, float* y, int64_t out) {
  Vector low[R][P], high[R][P];
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < P; ++q) {
      low[r][q] = Vector{};
      high[r][q] = Vector{};
    }
  }
  const W* panel = panels + first_panel * in * PANEL;
  constexpr int64_t ahead = PREFETCH_BYTES / (PANEL * sizeof(W));  // in rows of a panel
  for (int64_t i = 0; i < in; ++i) {
    Vector w_low[P], w_high[P];
    for (int q = 0; q < P; ++q) {
      __builtin_prefetch(panel + (q * in + i + ahead) * PANEL);
      __builtin_prefetch(panel + (q * in + i + ahead) * PANEL + WIDTH);
      w_low[q] = load_weights(panel + (q * in + i) * PANEL);
      w_high[q] = load_weights(panel + (q * in + i) * PANEL + WIDTH);
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
      std::memcpy(sums + WIDTH, &high[r][q], sizeof(Vector));
      for (int64_t c = 0; c < width; ++c) {
        const float sum = scale == nullptr ? sums[c] : sums[c] * scale[first + c];
        y[r * out + first + c] = bias == nullptr ? sum : sum + bias[first + c];
      }
    }
  }
}

// R rows times the panels [begin, end), P at a time while P remain, then one at a time.
template <int R, int P, typename W>
void rows_by_panel_range(const float* x, int64_t in, const W* panels, int64_t begin,
                         int64_t end, const float* scale, const float* bias, float* y,
                         int64_t out) {
  int64_t p = begin;
  for (; p + P <= end; p += P) rows_by_panels<R, P>(x, in, panels, p, scale, bias, y, out);
  for (; p < end; ++p) rows_by_panels<R, 1>(x, in, panels, p, scale, bias, y, out);
}

// `rows` (at most R) rows times the panels [begin, end) in one pass: at least 8 sums in flight
// where there are two rows or more; one row is bound by reading the panel, however many sums it
// keeps.
template <int R, typename W>
void rest_rows(int rows, const float* x, int64_t in, const W* panels, int64_t begin,
               int64_t end, const float* scale, const float* bias, float* y, int64_t out) {
  if constexpr (R > 0) {
    if (rows == R) {
      rows_by_panel_range<R, (R == 2 || R == 3) ? 2 : 1>(x, in, panels, begin, end, scale, bias,
                                                        y, out);
    } else {
      rest_rows<R - 1>(rows, x, in, panels, begin, end, scale, bias, y, out);
    }
  }
}

// y (rows, out) = x (rows, in) times the panels, threads sharing the panels: groups of GROUP,
// each group through every pass of rows while it is in cache.
template <typename W>
void rows_by_all_panels(const float* xs, int64_t rows, int64_t in, const W* ps, int64_t panels,
                        const float* scale, const float* bs, float* ys, int64_t out) {
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; group += GROUP) {
      const int64_t stop = std::min(group + GROUP, end);
      int64_t r = 0;
      for (; r + ROWS <= rows; r += ROWS) {
        rows_by_panel_range<ROWS, 1>(xs + r * in, in, ps, group, stop, scale, bs, ys + r * out,
                                     out);
      }
      // The rest in one pass, so that each weight is loaded (and widened) once per group.
      rest_rows<ROWS - 1>(static_cast<int>(rows - r), xs + r * in, in, ps, group, stop, scale,
                          bs, ys + r * out, out);
    }
  });
}

// x (rows, in) float32 -> x W^T + bias (rows, out), W given as `pack`'s panels: float32, or
// int8 with the scale (out,) they were packed with.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& panels,
                     const c10::optional<torch::Tensor>& bias, int64_t out,
                     const c10::optional<torch::Tensor>& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "linear expects float32 rows");
  TORCH_CHECK(panels.dim() == 3 && panels.size(1) == x.size(1) && panels.size(2) == PANEL &&
                  panels.size(0) * PANEL >= out && panels.is_contiguous(),
              "linear expects the panels of pack() for ", x.size(1), " input features");
  const bool int8 = panels.scalar_type() == torch::kInt8;
  TORCH_CHECK(int8 || panels.scalar_type() == torch::kFloat32,
              "linear expects float32 or int8 panels, got ", panels.scalar_type());
  const bool scaled = scale.has_value() && scale->defined();
  TORCH_CHECK(int8 == scaled, "linear expects a scale with int8 panels and only with them");
  torch::Tensor scale_tensor;
  const float* ss = nullptr;
  if (scaled) {
    scale_tensor = scale->contiguous();
    TORCH_CHECK(scale_tensor.scalar_type() == torch::kFloat32 && scale_tensor.numel() == out,
                "linear expects a float32 scale of ", out, " values");
    ss = scale_tensor.data_ptr<float>();
  }
  const auto rows_tensor = x.contiguous();
  const int64_t rows = rows_tensor.size(0), in = rows_tensor.size(1);
  auto y = torch::empty({rows, out}, rows_tensor.options());
  const float* xs = rows_tensor.data_ptr<float>();
  torch::Tensor bias_tensor;
  const float* bs = nullptr;
  if (bias.has_value() && bias->defined()) {
    bias_tensor = bias->contiguous();
    TORCH_CHECK(bias_tensor.numel() == out, "linear expects a bias of ", out, " values");
    bs = bias_tensor.data_ptr<float>();
  }
  float* ys = y.data_ptr<float>();
  if (int8) {
    rows_by_all_panels(xs, rows, in, panels.data_ptr<int8_t>(), panels.size(0), ss, bs, ys, out);
  } else {
    rows_by_all_panels(xs, rows, in, panels.data_ptr<float>(), panels.size(0), ss, bs, ys, out);
  }
  return y;
}

}  // namespace

// Operators of the dispatcher (torch.ops.eventful.*), so that profilers and tools see them.
TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def("small_rows_pack(Tensor weight, Tensor? scale=None) -> Tensor");
  library.def(
      "small_rows_linear(Tensor x, Tensor panels, Tensor? bias, int out, Tensor? scale=None) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("small_rows_pack", &pack);
  library.impl("small_rows_linear", &linear);
}
