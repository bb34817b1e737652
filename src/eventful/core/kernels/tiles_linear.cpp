// A linear layer in bfloat16 on AMX tiles (CPU): precision "bf16"'s linear layers on the rows a
// step selects, where the CPU has the tiles.
//
// One tile product multiplies 16 rows of 32 bfloat16 features by 32 features of 16 outputs and
// adds them to 16 x 16 float32 sums. At the few dozen rows of a step, oneDNN's bfloat16 linear
// spends most of its time around such products: on the four layers of a ViT-S/14 block, this
// kernel took 0.65x oneDNN's time at 64 rows, 0.58x at 16 and 0.81x at 257 (interleaved, 2
// threads, Intel Xeon with AMX). The weight is laid out once as the tiles read it (`tiles_pack`:
// per 16 outputs and 32 input features, 16 pairs of features of 16 outputs); the rows are
// rounded to bfloat16 once per call; each pair of 16-row blocks runs through pairs of 16-output
// panels with four sums in tiles (two where the last pair has no rows in its lower block), the
// next pair of panels asked for from memory block by block while the first rows' products run.
// The sums are float32; the bias and the activation (none, or the exact GELU of vectors.h) are
// applied in float32 as the sums leave the tiles, and the output is float32. A row's result
// does not depend on the rows beside it, nor on the threads. Built where the compiler targets
// AMX-BF16 and AVX512-BF16; used where the process is granted the tiles (tiles.h,
// `tiles_available`).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bfloat16.h"
#include "operators.h"
#include "tiles.h"
#include "vectors.h"

namespace {

constexpr int64_t OUTPUTS = 16;   // outputs of a panel
constexpr int64_t FEATURES = 32;  // input features of a tile

// weight (out, in) float32 -> panels (P, ceil(in / 32), 16, 16) of 32-bit pairs: panel p, input
// block b, pair j, output o holds the bfloat16 roundings of weight[16 p + o][32 b + 2 j] (low
// half) and [32 b + 2 j + 1] (high half). P is ceil(out / 16) rounded up to even (panels run in
// pairs); missing outputs and features are zero.
torch::Tensor tiles_pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32,
              "tiles_pack expects a float32 (out, in) weight, got ", weight.sizes(), " ",
              weight.scalar_type());
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t panels = ((out + OUTPUTS - 1) / OUTPUTS + 1) / 2 * 2;
  const int64_t blocks = (in + FEATURES - 1) / FEATURES;
  auto padded = torch::zeros({panels * OUTPUTS, blocks * FEATURES}, weight.options());
  padded.narrow(0, 0, out).narrow(1, 0, in).copy_(weight);
  return padded.to(torch::kBFloat16)
      .view(torch::kInt32)
      .view({panels, OUTPUTS, blocks, FEATURES / 2})
      .permute({0, 2, 3, 1})
      .contiguous();
}

#if EVENTFUL_TILES

// Sums (16 rows x 16 outputs) of one tile, stored, plus the bias and through the activation,
// into y's rows [row, row + 16) and columns [column, column + 16), those inside (rows, out):
// a vector per row.
void finish_tile(const float* sums, int64_t row, int64_t column, int64_t rows, int64_t out,
                 const float* bias, bool gelu, float* y) {
  const int64_t count_rows = std::min<int64_t>(16, rows - row);
  const int64_t count = std::min<int64_t>(16, out - column);
  if (count <= 0) return;
  const __mmask16 inside = static_cast<__mmask16>((1u << count) - 1u);
  const __m512 added =
      bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(inside, bias + column);
  for (int64_t r = 0; r < count_rows; ++r) {
    __m512 value = _mm512_add_ps(_mm512_loadu_ps(sums + r * 16), added);
    if (gelu) {
      value = (__m512)eventful_vectors::vector_gelu((eventful_vectors::Vector)value);
    }
    _mm512_mask_storeu_ps(y + (row + r) * out + column, inside, value);
  }
}

// `count` floats rounded to bfloat16: the CPU's conversion where it has AVX512-BF16 (to
// nearest, ties to even), else bfloat16.h's, which rounds as PyTorch does.
void round_row(const float* from, int64_t count, uint16_t* to) {
#if defined(__AVX512BF16__)
  int64_t c = 0;
  for (; c + 16 <= count; c += 16) {
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(from + c));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + c), (__m256i)rounded);
  }
  eventful_bfloat16::round_values(from + c, to + c, count - c);
#else
  eventful_bfloat16::round_values(from, to, count);
#endif
}

#endif  // EVENTFUL_TILES

}  // namespace

torch::Tensor eventful_kernels::tiles_linear(const torch::Tensor& x, const torch::Tensor& panels,
                                             const c10::optional<torch::Tensor>& bias,
                                             int64_t out, c10::string_view activation) {
  TORCH_CHECK(tiles_available(),
              "tiles_linear needs AMX-BF16 tiles, which this build or process lacks");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "tiles_linear expects float32 CPU rows (M, in), got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(activation == "none" || activation == "gelu",
              "tiles_linear expects the activation 'none' or 'gelu', got '", activation, "'");
  const int64_t rows = x.size(0), in = x.size(1);
  const int64_t blocks = (in + FEATURES - 1) / FEATURES;
  TORCH_CHECK(panels.dim() == 4 && panels.scalar_type() == torch::kInt32 &&
                  panels.size(1) == blocks && panels.size(2) == FEATURES / 2 &&
                  panels.size(3) == OUTPUTS && panels.size(0) % 2 == 0 &&
                  panels.size(0) * OUTPUTS >= out && panels.is_contiguous(),
              "tiles_linear expects the panels of tiles_pack for ", in, " input features and ",
              out, " outputs, got ", panels.sizes());
  torch::Tensor bias_values;
  const float* bs = nullptr;
  if (bias.has_value() && bias->defined()) {
    bias_values = bias->contiguous();
    TORCH_CHECK(bias_values.scalar_type() == torch::kFloat32 && bias_values.numel() == out,
                "tiles_linear expects a float32 bias of ", out, " values");
    bs = bias_values.data_ptr<float>();
  }
  auto y = torch::empty({rows, out}, x.options());
#if EVENTFUL_TILES
  const bool gelu = activation == "gelu";
  // The rows in bfloat16, padded with zeros to pairs of 16-row blocks and whole input blocks,
  // in memory this thread keeps between calls (a fresh buffer each call cost its page faults).
  const int64_t row_pairs = (rows + 31) / 32, width = blocks * FEATURES;
  thread_local std::vector<uint16_t> kept;
  kept.resize(std::max<size_t>(kept.size(), row_pairs * 32 * width));
  uint16_t* low = kept.data();
  const auto values = x.contiguous();
  const float* xs = values.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    round_row(xs + r * in, in, low + r * width);
    std::fill(low + r * width + in, low + (r + 1) * width, 0);
  }
  std::fill(low + rows * width, low + row_pairs * 32 * width, 0);
  const auto* weights = reinterpret_cast<const uint32_t*>(panels.data_ptr<int32_t>());
  const int64_t panel_pairs = panels.size(0) / 2, panel_size = blocks * 256;
  float* ys = y.data_ptr<float>();
  at::parallel_for(0, panel_pairs, 1, [&](int64_t begin, int64_t end) {
    eventful_tiles::configure();
    float sums[4][256];
    for (int64_t pair = begin; pair < end; ++pair) {
      const uint32_t* first = weights + 2 * pair * panel_size;
      const uint32_t* second = first + panel_size;
      // The next pair of panels, asked for block by block beside the first rows' products, so
      // that its lines come from memory while the tiles multiply.
      const uint32_t* next = pair + 1 < end ? second + panel_size : nullptr;
      for (int64_t row_pair = 0; row_pair < row_pairs; ++row_pair) {
        const uint16_t* upper = low + row_pair * 32 * width;
        const uint16_t* lower = upper + 16 * width;
        // A last pair of blocks with no rows in its lower block multiplies the upper one alone.
        const bool lower_rows = row_pair * 32 + 16 < rows;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t block = 0; block < blocks; ++block) {
          if (row_pair == 0 && next != nullptr) {
            for (int64_t at = block * 256; at < (block + 1) * 256; at += 16) {  // 64-byte lines
              __builtin_prefetch(next + at, 0, 2);
              __builtin_prefetch(next + panel_size + at, 0, 2);
            }
          }
          _tile_loadd(4, upper + block * FEATURES, width * 2);
          _tile_loadd(6, first + block * 256, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_loadd(7, second + block * 256, 64);
          _tile_dpbf16ps(1, 4, 7);
          if (lower_rows) {
            _tile_loadd(5, lower + block * FEATURES, width * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, sums[0], 64);
        _tile_stored(1, sums[1], 64);
        const int64_t row = row_pair * 32, column = 2 * pair * OUTPUTS;
        finish_tile(sums[0], row, column, rows, out, bs, gelu, ys);
        finish_tile(sums[1], row, column + 16, rows, out, bs, gelu, ys);
        if (lower_rows) {
          _tile_stored(2, sums[2], 64);
          _tile_stored(3, sums[3], 64);
          finish_tile(sums[2], row + 16, column, rows, out, bs, gelu, ys);
          finish_tile(sums[3], row + 16, column + 16, rows, out, bs, gelu, ys);
        }
      }
    }
    _tile_release();
  });
#endif
  return y;
}

TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def("tiles_pack(Tensor weight) -> Tensor");
  library.def(
      "tiles_linear(Tensor x, Tensor panels, Tensor? bias, int out, str activation='none') -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("tiles_pack", &tiles_pack);
  library.impl("tiles_linear", &eventful_kernels::tiles_linear);
}
