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
//
// Or they hold bfloat16 weights in pairs of input features (precision "bf16": half the bytes),
// and the rows are rounded to bfloat16 pairs as PyTorch rounds them: where the CPU has
// AVX512-BF16, one instruction multiplies a pair of rows' features by a pair of weights and adds
// both products to a float32 sum (twice the multiply-adds of float32 per instruction);
// elsewhere the pairs are widened to float32. The sums stay float32 (PyTorch's bfloat16 matmul
// rounds its output to bfloat16).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "operators.h"
#include "vectors.h"

namespace {

using eventful_vectors::Vector;
using eventful_vectors::WIDTH;

constexpr int64_t PANEL = 2 * WIDTH;                    // output columns per panel: 2 vectors
// Rows per pass: 2 ROWS accumulators, which with the weights fill most of the vector registers
// (16 with AVX2, 32 with AVX-512). A pass after the first reads the weights from cache, and
// its time adds to the time of reading them from memory, where the first pass's arithmetic
// hides behind it: at 13 and 14 rows one pass of 14 took 0.75-0.8 of the time of a pass of 12
// and another of the rest, weights from memory (Intel Xeon with AVX-512, 2 threads); 15 rows in
// one pass measured slower than 14 (the registers run out). Passes over bfloat16 pairs spend
// their time multiplying rather than waiting on memory: there 12 rows and the rest measured
// faster than 14 and the rest at 16 rows.
constexpr int ROWS = WIDTH == 16 ? 14 : 6;
constexpr int BFLOAT16_ROWS = WIDTH == 16 ? 12 : 6;
// How far ahead of its loads a pass asks for the weights: at a few rows the passes are bound by
// reading the weights from the last-level cache or memory, and the hardware's own prefetching
// measured 1.5-1.8x slower at 4 and 16 rows (Intel Xeon with AVX-512, 2 threads). Float32
// weights are asked for far ahead into the L2 cache, so that enough lines are on their way to
// keep memory busy, and near ahead into L1: against 8 KB ahead into L1 alone, 1.04-1.2x at 4 to
// 128 rows (same machine). The int8 and bfloat16 panels, a quarter and half the bytes, spend
// their time widening or multiplying: the second request measured 2-10% slower there, so they
// keep the one.
constexpr int64_t PREFETCH_BYTES = 8192;
constexpr int64_t NEAR_PREFETCH_BYTES = 2048;
constexpr int64_t FAR_PREFETCH_BYTES = 32768;
constexpr int64_t GROUP = 2;  // panels that every pass of rows reads while they are in cache

// weight (out, in) -> panels (ceil(out / PANEL), in, PANEL), the missing columns zero. With a
// scale (out,), the panels are int8: each weight divided by its column's scale, rounded to the
// nearest integer and clamped to [-127, 127]. With `bfloat16`, the panels are (ceil(out /
// PANEL), ceil(in / 2), PANEL, 2): each weight rounded to bfloat16, the features of a pair side
// by side, a missing last feature zero.
torch::Tensor pack(const torch::Tensor& weight, const c10::optional<torch::Tensor>& scale,
                   bool bfloat16) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32,
              "pack expects a float32 (out, in) weight, got ", weight.sizes(), " ",
              weight.scalar_type());
  const bool scaled = scale.has_value() && scale->defined();
  TORCH_CHECK(!(scaled && bfloat16), "pack expects a scale (int8 panels) or bfloat16, not both");
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t panels = (out + PANEL - 1) / PANEL;
  if (bfloat16) {
    const int64_t pairs = (in + 1) / 2;
    auto padded = torch::zeros({panels * PANEL, 2 * pairs}, weight.options());
    padded.narrow(0, 0, out).narrow(1, 0, in).copy_(weight);
    return padded.to(torch::kBFloat16)
        .view({panels, PANEL, pairs, 2})
        .permute({0, 2, 1, 3})
        .contiguous();
  }
  auto padded = torch::zeros({panels * PANEL, in}, weight.options());
  if (scaled) {
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

// Asks for the weights of the panel row at `at` (PANEL weights of one input feature, or of a
// pair of them) ahead of their use: near and far with `Far`, else PREFETCH_BYTES ahead.
template <bool Far, typename W>
inline void prefetch_ahead(const W* at) {
  const char* bytes = reinterpret_cast<const char*>(at);
  for (int64_t line = 0; line < PANEL * static_cast<int64_t>(sizeof(W)); line += 64) {
    if constexpr (Far) {
      __builtin_prefetch(bytes + NEAR_PREFETCH_BYTES + line, 0, 3);
      __builtin_prefetch(bytes + FAR_PREFETCH_BYTES + line, 0, 1);
    } else {
      __builtin_prefetch(bytes + PREFETCH_BYTES + line, 0, 3);
    }
  }
}

// The WIDTH weights at `at` as floats.
inline Vector load_weights(const float* at) { return eventful_vectors::load(at); }

inline Vector load_weights(const int8_t* at) {
  // Sign-extended to 32-bit integers, then converted: two instructions (GCC's generic vector
  // conversion of 8 bytes measured 2-5x slower than float32 weights).
#if defined(__AVX512F__)
  return (Vector)_mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at))));
#elif defined(__AVX2__)
  return (Vector)_mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at))));
#else
  typedef int8_t Bytes __attribute__((vector_size(WIDTH)));
  Bytes bytes;
  std::memcpy(&bytes, at, sizeof(Bytes));
  return __builtin_convertvector(bytes, Vector);
#endif
}

// A row's two vectors of sums of one panel into y's columns from panel * PANEL (at most `out`),
// times each column's scale and plus its bias where given. The scale and the bias go in one
// fused multiply-add where there are both, written out: left to the compiler, `sum * scale +
// bias` was fused in some instantiations and not in others, so a row's result depended on the
// rows beside it.
inline void finish_row(Vector low, Vector high, int64_t panel, const float* scale,
                       const float* bias, float* y, int64_t out) {
  const int64_t first = panel * PANEL, width = std::min(PANEL, out - first);
  float sums[PANEL];
  std::memcpy(sums, &low, sizeof(Vector));
  std::memcpy(sums + WIDTH, &high, sizeof(Vector));
  for (int64_t c = 0; c < width; ++c) {
    float sum = sums[c];
    if (scale != nullptr && bias != nullptr) {
      sum = std::fma(sum, scale[first + c], bias[first + c]);
    } else if (scale != nullptr) {
      sum *= scale[first + c];
    } else if (bias != nullptr) {
      sum += bias[first + c];
    }
    y[first + c] = sum;
  }
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
  for (int64_t i = 0; i < in; ++i) {
    Vector w_low[P], w_high[P];
    for (int q = 0; q < P; ++q) {
      prefetch_ahead<std::is_same_v<W, float>>(panel + (q * in + i) * PANEL);
      w_low[q] = load_weights(panel + (q * in + i) * PANEL);
      w_high[q] = load_weights(panel + (q * in + i) * PANEL + WIDTH);
    }
    for (int r = 0; r < R; ++r) {
      // One fused multiply-add per weight whatever R and P (left to the compiler, the sums
      // rounded differently from one instantiation to another).
      const Vector value = eventful_vectors::splat(x[r * in + i]);
      for (int q = 0; q < P; ++q) {
        low[r][q] = eventful_vectors::multiply_add(value, w_low[q], low[r][q]);
        high[r][q] = eventful_vectors::multiply_add(value, w_high[q], high[r][q]);
      }
    }
  }
  for (int q = 0; q < P; ++q) {
    for (int r = 0; r < R; ++r) {
      finish_row(low[r][q], high[r][q], first_panel + q, scale, bias, y + r * out, out);
    }
  }
}

// A float32 value rounded to bfloat16 (to nearest, ties to even; NaN stays NaN), as PyTorch
// rounds it: the upper 16 bits of its float32 pattern.
inline uint32_t bfloat16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;  // NaN
  return (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
}

// x (rows, in) float32 -> (rows, ceil(in / 2)) bfloat16 pairs, the first feature of a pair in
// the low 16 bits (the order of the panels' pairs), a missing last feature zero.
void bfloat16_pairs(const float* x, int64_t rows, int64_t in, uint32_t* pairs) {
  const int64_t count = (in + 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t < count; ++t) {
      const uint32_t first = bfloat16_bits(x[r * in + 2 * t]);
      const uint32_t second = 2 * t + 1 < in ? bfloat16_bits(x[r * in + 2 * t + 1]) : 0u;
      pairs[r * count + t] = first | (second << 16);
    }
  }
}

#if !defined(__AVX512BF16__)
// The features of WIDTH bfloat16 pairs as float32: the first ones, then the second ones.
inline Vector first_of_pairs(eventful_vectors::Integers pairs) {
  const eventful_vectors::Integers bits = pairs << 16;
  Vector value;
  std::memcpy(&value, &bits, sizeof(Vector));
  return value;
}

inline Vector second_of_pairs(eventful_vectors::Integers pairs) {
  const eventful_vectors::Integers bits = pairs & static_cast<int32_t>(0xffff0000u);
  Vector value;
  std::memcpy(&value, &bits, sizeof(Vector));
  return value;
}
#endif

// `rows_by_panels` with bfloat16 pairs: x (R, pairs) pairs of features, each panel (pairs,
// PANEL) pairs of weights.
template <int R, int P>
void rows_by_panels(const uint32_t* x, int64_t pairs, const uint32_t* panels,
                    int64_t first_panel, const float* scale, const float* bias, float* y,
                    int64_t out) {
  const uint32_t* panel = panels + first_panel * pairs * PANEL;
  constexpr int64_t ahead = PREFETCH_BYTES / (PANEL * sizeof(uint32_t));  // in pairs
#if defined(__AVX512BF16__)
  __m512 low[R][P], high[R][P];
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < P; ++q) {
      low[r][q] = _mm512_setzero_ps();
      high[r][q] = _mm512_setzero_ps();
    }
  }
  for (int64_t t = 0; t < pairs; ++t) {
    __m512bh w_low[P], w_high[P];
    for (int q = 0; q < P; ++q) {
      const uint32_t* at = panel + (q * pairs + t) * PANEL;
      __builtin_prefetch(at + ahead * PANEL);
      __builtin_prefetch(at + ahead * PANEL + WIDTH);
      std::memcpy(&w_low[q], at, sizeof(__m512bh));
      std::memcpy(&w_high[q], at + WIDTH, sizeof(__m512bh));
    }
    for (int r = 0; r < R; ++r) {
      const __m512i both = _mm512_set1_epi32(static_cast<int>(x[r * pairs + t]));
      __m512bh value;
      std::memcpy(&value, &both, sizeof(value));
      for (int q = 0; q < P; ++q) {
        low[r][q] = _mm512_dpbf16_ps(low[r][q], value, w_low[q]);
        high[r][q] = _mm512_dpbf16_ps(high[r][q], value, w_high[q]);
      }
    }
  }
#else
  Vector low[R][P], high[R][P];
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < P; ++q) {
      low[r][q] = Vector{};
      high[r][q] = Vector{};
    }
  }
  for (int64_t t = 0; t < pairs; ++t) {
    eventful_vectors::Integers w_low[P], w_high[P];
    for (int q = 0; q < P; ++q) {
      const uint32_t* at = panel + (q * pairs + t) * PANEL;
      __builtin_prefetch(at + ahead * PANEL);
      __builtin_prefetch(at + ahead * PANEL + WIDTH);
      std::memcpy(&w_low[q], at, sizeof(w_low[q]));
      std::memcpy(&w_high[q], at + WIDTH, sizeof(w_high[q]));
    }
    for (int r = 0; r < R; ++r) {
      const uint32_t both = x[r * pairs + t];
      float first, second;
      const uint32_t first_bits = both << 16, second_bits = both & 0xffff0000u;
      std::memcpy(&first, &first_bits, sizeof(first));
      std::memcpy(&second, &second_bits, sizeof(second));
      for (int q = 0; q < P; ++q) {
        low[r][q] = eventful_vectors::multiply_add(eventful_vectors::splat(first),
                                                   first_of_pairs(w_low[q]), low[r][q]);
        low[r][q] = eventful_vectors::multiply_add(eventful_vectors::splat(second),
                                                   second_of_pairs(w_low[q]), low[r][q]);
        high[r][q] = eventful_vectors::multiply_add(eventful_vectors::splat(first),
                                                    first_of_pairs(w_high[q]), high[r][q]);
        high[r][q] = eventful_vectors::multiply_add(eventful_vectors::splat(second),
                                                    second_of_pairs(w_high[q]), high[r][q]);
      }
    }
  }
#endif
  for (int q = 0; q < P; ++q) {
    for (int r = 0; r < R; ++r) {
      finish_row((Vector)low[r][q], (Vector)high[r][q], first_panel + q, nullptr, bias,
                 y + r * out, out);
    }
  }
}

// R rows times the panels [begin, end), P at a time while P remain, then one at a time.
template <int R, int P, typename X, typename W>
void rows_by_panel_range(const X* x, int64_t in, const W* panels, int64_t begin,
                         int64_t end, const float* scale, const float* bias, float* y,
                         int64_t out) {
  int64_t p = begin;
  for (; p + P <= end; p += P) rows_by_panels<R, P>(x, in, panels, p, scale, bias, y, out);
  for (; p < end; ++p) rows_by_panels<R, 1>(x, in, panels, p, scale, bias, y, out);
}

// `rows` (at most R) rows times the panels [begin, end) in one pass: at least 8 sums in flight
// where there are two rows or more; one row is bound by reading the panel, however many sums it
// keeps.
template <int R, typename X, typename W>
void rest_rows(int rows, const X* x, int64_t in, const W* panels, int64_t begin,
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
// each group through every pass of rows while it is in cache, then with `gelu` its outputs
// through the GELU while they are.
template <typename X, typename W>
void rows_by_all_panels(const X* xs, int64_t rows, int64_t in, const W* ps, int64_t panels,
                        const float* scale, const float* bs, float* ys, int64_t out, bool gelu) {
  constexpr int PASS = std::is_same_v<X, uint32_t> ? BFLOAT16_ROWS : ROWS;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; group += GROUP) {
      const int64_t stop = std::min(group + GROUP, end);
      int64_t r = 0;
      for (; r + PASS <= rows; r += PASS) {
        rows_by_panel_range<PASS, 1>(xs + r * in, in, ps, group, stop, scale, bs, ys + r * out,
                                     out);
      }
      // The rest in one pass, so that each weight is loaded (and widened) once per group.
      rest_rows<PASS - 1>(static_cast<int>(rows - r), xs + r * in, in, ps, group, stop, scale,
                          bs, ys + r * out, out);
      if (gelu) {
        const int64_t first = group * PANEL, last = std::min(stop * PANEL, out);
        for (r = 0; r < rows; ++r) eventful_vectors::gelu_in_place(ys + r * out + first, last - first);
      }
    }
  });
}

// x (rows, in) float32 -> x W^T + bias (rows, out), W given as `pack`'s panels: float32, int8
// with the scale (out,) they were packed with, or bfloat16 pairs; then `activation`: "none", or
// "gelu", GELU with the exact error function (vectors.h).
}  // namespace

torch::Tensor eventful_kernels::small_rows_linear(const torch::Tensor& x,
                                                  const torch::Tensor& panels,
                                                  const c10::optional<torch::Tensor>& bias,
                                                  int64_t out,
                                                  const c10::optional<torch::Tensor>& scale,
                                                  c10::string_view activation) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "linear expects float32 rows");
  TORCH_CHECK(activation == "none" || activation == "gelu",
              "linear expects the activation 'none' or 'gelu', got '", activation, "'");
  const bool gelu = activation == "gelu";
  const int64_t in = x.size(1);
  const bool bfloat16 = panels.scalar_type() == torch::kBFloat16;
  const bool int8 = panels.scalar_type() == torch::kInt8;
  TORCH_CHECK(int8 || bfloat16 || panels.scalar_type() == torch::kFloat32,
              "linear expects float32, int8 or bfloat16 panels, got ", panels.scalar_type());
  const int64_t depth = bfloat16 ? (in + 1) / 2 : in;  // features, or pairs of features
  const bool laid_out = bfloat16 ? panels.dim() == 4 && panels.size(3) == 2 : panels.dim() == 3;
  TORCH_CHECK(laid_out && panels.size(1) == depth && panels.size(2) == PANEL &&
                  panels.size(0) * PANEL >= out && panels.is_contiguous(),
              "linear expects the panels of pack() for ", in, " input features");
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
  const int64_t rows = rows_tensor.size(0);
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
  const int64_t count = panels.size(0);
  if (bfloat16) {
    std::vector<uint32_t> pairs(rows * depth);
    bfloat16_pairs(xs, rows, in, pairs.data());
    const auto* weights = reinterpret_cast<const uint32_t*>(panels.data_ptr<at::BFloat16>());
    rows_by_all_panels(pairs.data(), rows, depth, weights, count, ss, bs, ys, out, gelu);
  } else if (int8) {
    rows_by_all_panels(xs, rows, in, panels.data_ptr<int8_t>(), count, ss, bs, ys, out, gelu);
  } else {
    rows_by_all_panels(xs, rows, in, panels.data_ptr<float>(), count, ss, bs, ys, out, gelu);
  }
  return y;
}

// Operators of the dispatcher (torch.ops.eventful.*), so that profilers and tools see them.
TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def("small_rows_pack(Tensor weight, Tensor? scale=None, bool bfloat16=False) -> Tensor");
  library.def(
      "small_rows_linear(Tensor x, Tensor panels, Tensor? bias, int out, Tensor? scale=None, "
      "str activation='none') -> Tensor");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("small_rows_pack", &pack);
  library.impl("small_rows_linear", &eventful_kernels::small_rows_linear);
}
